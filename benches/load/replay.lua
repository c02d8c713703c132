-- Every request carries the same key: after the first, each is a replay.
math.randomseed(os.time())
local key = "replay-" .. tostring(os.time()) .. "-" .. tostring(math.random(1, 1000000000))
function request()
  return wrk.format("POST", nil, {
    ["Idempotency-Key"] = key,
    ["Content-Type"] = "application/json",
  }, '{"item":"book","quantity":1}')
end
