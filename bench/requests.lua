-- wrk script: replays pre-signed Twilio webhooks from a file, one line each:
-- "<signature>\t<form body>". Each wrk thread takes its own slice, so no request repeats.
-- Arguments: <file> <threads> [once]. Without "once" a thread starts its slice over when it
-- runs out (repeats are deduplicated by Parley); with "once" each webhook is posted once
-- (idle connections ask /healthz meanwhile), the thread prints "all answered" when its whole
-- slice is, and done() prints "posted <answered webhooks>". wrk itself runs for its -d
-- duration whatever the threads do: bench/webhook.py's run_wrk stops it with SIGINT (wrk then
-- prints its summary) when it reads "all answered".
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
  once = args[3] == "once"
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
  answered = 0
  first = nil
  last = nil
end

function request()
  if not probed then
    -- wrk calls request() once before connecting and discards what it returns: no line may
    -- be spent on that call, or the first webhook is never posted.
    probed = true
    return wrk.format("GET", "/healthz")
  end
  position = position + 1
  if once and position > #requests then
    return wrk.format("GET", "/healthz")
  end
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
  if once and string.find(body, '{"status"', 1, true) ~= 1 then -- not a /healthz answer
    answered = answered + 1
    if answered == #requests then
      io.write("all answered\n")
      io.flush()
    end
  end
end

function done(summary, latency, requests)
  local posted = 0
  for _, thread in ipairs(threads) do
    posted = posted + (thread:get("answered") or 0)
  end
  if posted > 0 then
    io.write(string.format("posted %d\n", posted))
  end
end
