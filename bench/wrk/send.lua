-- POST one message with a body of 100 bytes.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"content":"' .. string.rep("x", 86) .. '"}'
