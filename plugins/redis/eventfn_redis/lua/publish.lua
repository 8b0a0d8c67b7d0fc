-- publish: a batch of messages, each to every subscription its destination has now.
-- ARGV: number of destinations, those destinations, then 8 fields per message (publish_at).
-- Every destination is checked before anything is written. Reply: how many copies.
local missing = unknown_destination(2, tonumber(ARGV[1]))
if missing then
  return redis.error_reply('UNKNOWN_DESTINATION ' .. missing)
end
local now = now_ms()
local i = 2 + tonumber(ARGV[1])
local messages = 0
while i <= #ARGV do
  i = publish_at(i, now)
  messages = messages + 1
end
return messages
