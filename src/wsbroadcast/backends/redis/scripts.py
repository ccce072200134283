"""The Lua scripts of the Redis backend: every change that nodes must agree on is one script.

Each script's comment says its KEYS and ARGV. Redis runs one script at a time, so what a
script reads and writes is atomic.
"""

from __future__ import annotations

# KEYS: stream hash, log, members, receipt. ARGV: candidate epoch (used only if the room has
# no stream), max entries, slack, max bytes, text head, text tail, receipt ttl (ms), room ttl
# (ms, 0 = never). The seq and epoch are spliced into the text here, so the stored text is
# final. The receipt (envelope id -> "seq epoch") makes a retried publish a no-op. The log is
# trimmed, oldest first, while it holds more than max entries (+ slack) or max bytes, but
# never below its newest entry, which every node's reader must still be able to read.
PUBLISH = """
local done = redis.call('GET', KEYS[4])
if done then return done end
local meta = redis.call('HMGET', KEYS[1], 'seq', 'epoch', 'bytes')
local epoch, seq, bytes = meta[2], tonumber(meta[1] or '0'), tonumber(meta[3] or '0')
if not epoch then
  epoch, seq, bytes = ARGV[1], 0, 0
  -- A log left by a forgotten stream is not this one's. (Only deleted if it exists: after a
  -- first write, Redis lets a script write past maxmemory, and XADD must be refused then.)
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('DEL', KEYS[2]) end
end
seq = seq + 1
local id = string.format('%d', seq)
local text = ARGV[5] .. id .. ',"epoch":"' .. epoch .. ARGV[6]
local added = redis.pcall('XADD', KEYS[2], id .. '-0', 'e', text)
if type(added) == 'table' and added.err then
  if not string.find(added.err, 'equal or smaller', 1, true) then
    return redis.error_reply(added.err)
  end
  -- The log holds entries this counter does not know: it is not this stream's any more.
  epoch, seq, bytes, id = ARGV[1], 1, 0, '1'
  text = ARGV[5] .. id .. ',"epoch":"' .. epoch .. ARGV[6]
  redis.call('DEL', KEYS[2])
  redis.call('XADD', KEYS[2], '1-0', 'e', text)
end
bytes = bytes + #text
local maxn, maxb = tonumber(ARGV[2]), tonumber(ARGV[4])
local n = redis.call('XLEN', KEYS[2])
local excess = 0
if n > maxn + tonumber(ARGV[3]) then excess = n - maxn end
if excess > 0 or bytes > maxb then
  local from, keep = '-', nil
  while (excess > 0 or bytes > maxb) and n > 1 do
    local batch = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', 100)
    if #batch == 0 then break end
    for _, entry in ipairs(batch) do
      if not ((excess > 0 or bytes > maxb) and n > 1) then break end
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'e' then bytes = bytes - #fields[i + 1] end
      end
      excess, n = excess - 1, n - 1
      keep = string.format('%d', tonumber(string.match(entry[1], '^(%d+)')) + 1) .. '-0'
    end
    from = keep
  end
  if keep then redis.call('XTRIM', KEYS[2], 'MINID', keep) end
  if n <= 1 then bytes = #text end
end
redis.call('HSET', KEYS[1], 'seq', id, 'epoch', epoch, 'bytes', bytes)
local ttl = tonumber(ARGV[8])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
local receipt = id .. ' ' .. epoch
redis.call('SET', KEYS[4], receipt, 'PX', ARGV[7])
return receipt
"""

# KEYS: generation. ARGV: candidate id. Returns the id of this Redis's data.
ENSURE_GENERATION = """
redis.call('HSETNX', KEYS[1], 'id', ARGV[1])
return redis.call('HGET', KEYS[1], 'id')
"""

# Checks (and keeps alive) the rooms this node reads or holds presence in, all of one
# partition. KEYS: the partition's generation (only to route the call to its slot). ARGV: room ttl
# (ms, 0 = never), room key prefix, then per room five values: room (as written in its keys,
# see _key_part), the epoch this node reads ('' = no stream known yet, '-' = only refresh the
# TTL), the last seq it delivered, the id of that envelope ('' = unknown), a candidate epoch.
# A stream this node was reading that is gone, or whose counter went back below what it
# delivered, or whose entry at that seq is another envelope (Redis restored from an older
# snapshot), is given the candidate epoch atomically, so every node resets to the same new
# stream. Returns epoch, seq per room.
CHECK_ROOMS = """
local ttl, prefix, out = tonumber(ARGV[1]), ARGV[2], {}
for i = 3, #ARGV, 5 do
  local base = prefix .. ARGV[i]
  local meta_key, log_key = base .. ':stream', base .. ':log'
  if ttl > 0 then
    redis.call('PEXPIRE', meta_key, ttl)
    redis.call('PEXPIRE', log_key, ttl)
    redis.call('PEXPIRE', base .. ':members', ttl)
  end
  local expected, last, last_id = ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  if expected == '-' then
    out[#out + 1] = ''
    out[#out + 1] = '0'
  else
    local meta = redis.call('HMGET', meta_key, 'seq', 'epoch')
    local epoch, seq = meta[2], tonumber(meta[1] or '0')
    local renew = false
    if expected ~= '' then
      if not epoch then
        renew = true
      elseif epoch == expected then
        if seq < last then
          renew = true
        elseif last > 0 and last_id ~= '' then
          local at = string.format('%d', last) .. '-0'
          local entry = redis.call('XRANGE', log_key, at, at)
          if entry[1] then
            local fields = entry[1][2]
            if fields[2] == nil or not string.find(fields[2], last_id, 1, true) then
              renew = true
            end
          end
        end
      end
    end
    if renew then
      epoch, seq = ARGV[i + 4], 0
      redis.call('DEL', log_key)
      redis.call('HSET', meta_key, 'seq', '0', 'epoch', epoch, 'bytes', '0')
      if ttl > 0 then redis.call('PEXPIRE', meta_key, ttl) end
    end
    out[#out + 1] = epoch or ''
    out[#out + 1] = string.format('%d', seq)
  end
end
return out
"""

# Shared by the presence scripts: true if a node other than ARGV[1] holding a connection of
# the client in KEYS[1] is alive. Leftovers of dead nodes are dropped on the way.
OTHER_LIVE_NODE = """
local function other_live_node(hash, me, node_prefix)
  local fields = redis.call('HGETALL', hash)
  for i = 1, #fields, 2 do
    local node = fields[i]
    if node ~= me and tonumber(fields[i + 1]) > 0 then
      if redis.call('EXISTS', node_prefix .. node) == 1 then return true end
      redis.call('HDEL', hash, node)
    end
  end
  return false
end
local function keep(ttl, a, b)
  if tonumber(ttl) > 0 then
    redis.call('PEXPIRE', a, ttl)
    redis.call('PEXPIRE', b, ttl)
  end
end
"""

# KEYS: client hash, members set, node index. ARGV: node id, client, index entry, node
# prefix, room ttl (ms, 0 = never), node keys ttl (ms).
ADD_PRESENCE = (
    OTHER_LIVE_NODE
    + """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
keep(ARGV[5], KEYS[1], KEYS[2])
if n > 1 or other_live_node(KEYS[1], ARGV[1], ARGV[4]) then return 0 end
return 1
"""
)

# Same KEYS and ARGV as ADD_PRESENCE; ARGV[7] is the count to restore.
RESTORE_PRESENCE = (
    OTHER_LIVE_NODE
    + """
local new = redis.call('HSET', KEYS[1], ARGV[1], ARGV[7])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
keep(ARGV[5], KEYS[1], KEYS[2])
if new == 0 or other_live_node(KEYS[1], ARGV[1], ARGV[4]) then return 0 end
return 1
"""
)

# Same KEYS and ARGV as ADD_PRESENCE.
REMOVE_PRESENCE = (
    OTHER_LIVE_NODE
    + """
local c = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if c <= 0 then return 0 end
if c > 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[3])
if other_live_node(KEYS[1], ARGV[1], ARGV[4]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""
)

# KEYS: client hash, members set, the reaped node's index and heartbeat. ARGV: reaped node id,
# client, index entry, node prefix, "1" to back off if the node is alive after all. Each entry
# is reaped once (whoever removes it from the index); returns 1 if the client is gone.
REAP_PRESENCE = (
    OTHER_LIVE_NODE
    + """
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
if redis.call('SREM', KEYS[3], ARGV[3]) == 0 then return 0 end
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
if other_live_node(KEYS[1], ARGV[1], ARGV[4]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""
)

# KEYS: members set. ARGV: client hash prefix, node prefix. Read-only. The members are client
# ids; their hashes' keys write ':' as '%3A' (see _key_part).
PRESENCE = """
local out, alive = {}, {}
for _, client in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local fields = redis.call('HGETALL', ARGV[1] .. (string.gsub(client, ':', '%%3A')))
  for i = 1, #fields, 2 do
    local node = fields[i]
    if alive[node] == nil then alive[node] = redis.call('EXISTS', ARGV[2] .. node) == 1 end
    if alive[node] and tonumber(fields[i + 1]) > 0 then
      out[#out + 1] = client
      break
    end
  end
end
return out
"""

# KEYS: heartbeat key, nodes set, node index, wake stream, generation. ARGV: presence ttl
# (ms), node id, node keys ttl (ms), room ttl (ms, 0 = never), then the keys of the client
# hashes this node holds, which it keeps alive. Returns whether the heartbeat key existed,
# and the generation id ('' if none).
HEARTBEAT = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  for i = 5, #ARGV do redis.call('PEXPIRE', ARGV[i], ttl) end
end
return {existed, redis.call('HGET', KEYS[5], 'id') or ''}
"""

# KEYS: bucket. ARGV: rate (tokens per second), burst. A token bucket on Redis's clock, so
# every node shares it; it expires once it would be full again.
ALLOW = """
if redis.replicate_commands then redis.replicate_commands() end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(bucket[1]), tonumber(bucket[2])
if not tokens or not at then tokens, at = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return allowed
"""
