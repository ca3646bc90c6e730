-- POST a batch of 100 messages, each with a body of 100 bytes.
local entry = '{"content":"' .. string.rep("x", 86) .. '"}'
local entries = {}
for i = 1, 100 do entries[i] = entry end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"messages":[' .. table.concat(entries, ",") .. ']}'
