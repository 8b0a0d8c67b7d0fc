-- retire: forget this consumer in the groups it fetched from, where it holds nothing.
-- ARGV: consumer, then sid and group per subscription. Reply: how many it left.
local consumer = ARGV[1]
local left = 0
for i = 2, #ARGV, 2 do
  local stream = sub_key(ARGV[i], ':stream')
  if redis.call('EXISTS', stream) == 1 then
    local holds = redis.call('XPENDING', stream, ARGV[i + 1], '-', '+', 1, consumer)
    if #holds == 0 then
      redis.call('XGROUP', 'DELCONSUMER', stream, ARGV[i + 1], consumer)
      left = left + 1
    end
  end
end
return left
