-- wrk script: replays pre-signed Twilio webhooks from a file, one line each:
-- "<signature>\t<form body>". Each wrk thread takes its own slice, so no request repeats.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local path = args[1]
  local nthreads = tonumber(args[2])
  local lines = {}
  local i = 0
  for line in io.lines(path) do
    if i % nthreads == id then
      table.insert(lines, line)
    end
    i = i + 1
  end
  requests = lines
  position = 0
end

function request()
  position = position + 1
  local line = requests[((position - 1) % #requests) + 1]
  local tab = string.find(line, "\t", 1, true)
  local signature = string.sub(line, 1, tab - 1)
  local body = string.sub(line, tab + 1)
  return wrk.format("POST", "/webhooks/twilio/sms", {
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["X-Twilio-Signature"] = signature,
  }, body)
end

function response(status, headers, body)
  if status ~= 200 then
    errors = (errors or 0) + 1
  end
end
