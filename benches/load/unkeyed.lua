-- No key: for exempt routes.
function request()
  return wrk.format("POST", nil, { ["Content-Type"] = "application/json" },
    '{"item":"book","quantity":1}')
end
