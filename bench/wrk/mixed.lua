-- Alternate a 100-byte send and a receive on each connection: a 50/50 mix.
local send_body = '{"content":"' .. string.rep("x", 86) .. '"}'
local counter = 0
request = function()
  counter = counter + 1
  if counter % 2 == 0 then
    return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, send_body)
  end
  return wrk.format("GET", nil)
end
