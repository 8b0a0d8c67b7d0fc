-- extend: push leases still held to `lease` ms from now.
-- ARGV: consumer, lease (ms), then per subscription its sid, n, and n receipt tokens.
-- Reply: how many leases were still held.
local consumer, lease = ARGV[1], math.min(tonumber(ARGV[2]), MAX_LEASE)
local leased_until = now_ms() + lease - MAX_LEASE
local extended = 0
local i = 3
while i <= #ARGV do
  local sub, last = subscription(ARGV[i]), i + 1 + tonumber(ARGV[i + 1])
  for j = i + 2, last do
    local entry = sub and held(sub, ARGV[j])
    if entry then
      sub.done[#sub.done + 1] = entry
      extended = extended + 1
    end
  end
  i = last + 1
end
for _, sub in pairs(sub_cache) do
  if sub and #sub.done > 0 then
    for start = 1, #sub.done, 1000 do
      local args = {'XCLAIM', sub.stream, sub.group, consumer, 0}
      for j = start, math.min(#sub.done, start + 999) do
        args[#args + 1] = sub.done[j]
      end
      args[#args + 1] = 'TIME'
      args[#args + 1] = leased_until
      args[#args + 1] = 'JUSTID'
      redis.call(unpack(args))
    end
  end
end
return extended
