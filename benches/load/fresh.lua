-- Every request carries a key never used before.
math.randomseed(os.time())
local prefix = tostring(os.time()) .. "-" .. tostring(math.random(1, 1000000000))
local counter = 0
function request()
  counter = counter + 1
  return wrk.format("POST", nil, {
    ["Idempotency-Key"] = prefix .. "-" .. counter,
    ["Content-Type"] = "application/json",
  }, '{"item":"book","quantity":1}')
end
