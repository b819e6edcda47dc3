"""Lua scripts for the writes: each runs atomically on the server, in one round trip.

Why Lua rather than MULTI/EXEC: the idempotency check (same id + same content hash = no rewrite)
must read and write in the same atomic step, which MULTI cannot do without WATCH retries.
Redis logs a script's effects to the AOF as one MULTI/EXEC block, and on start-up drops a
truncated trailing block, so a crash mid-write never leaves a document without its memory.

Key layout (KEYS, all sharing the hash tag ``{bank}`` so a cluster keeps them in one slot):
``KEYS[1]`` ids zset, ``KEYS[2]`` event stream, ``KEYS[3]`` per-compressor-version counts,
then per document ``doc``, ``mem``. Optional string fields arrive as ``"0"`` (null) or
``"1" .. value``.
"""

PUT = r"""
local cv = ARGV[1]
local maxlen = ARGV[2]
local n = tonumber(ARGV[3])
local out = {}
for i = 0, n - 1 do
  local dk = KEYS[4 + 2 * i]
  local mk = KEYS[5 + 2 * i]
  local a = 4 + 8 * i
  local id, h = ARGV[a], ARGV[a + 1]
  local old = redis.call('HMGET', dk, 'hash', 'cv', 'version')
  local status, version
  if old[1] == h and old[2] == cv and redis.call('EXISTS', mk) == 1 then
    status, version = 'unchanged', tonumber(old[3])
  else
    if old[1] then
      status = 'replaced'
      version = tonumber(old[3])
      if old[1] ~= h then version = version + 1 end
      if redis.call('HINCRBY', KEYS[3], old[2], -1) <= 0 then redis.call('HDEL', KEYS[3], old[2]) end
      redis.call('DEL', dk)
    else
      status, version = 'new', 1
    end
    local f = {'id', id, 'hash', h, 'text', ARGV[a + 2], 'cv', cv, 'version', version, 'received', ARGV[a + 6]}
    local title, source, pub = ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
    if string.sub(title, 1, 1) == '1' then f[#f + 1] = 'title'; f[#f + 1] = string.sub(title, 2) end
    if string.sub(source, 1, 1) == '1' then f[#f + 1] = 'source'; f[#f + 1] = string.sub(source, 2) end
    if pub ~= '' then f[#f + 1] = 'published'; f[#f + 1] = pub end
    redis.call('HSET', dk, unpack(f))
    redis.call('SET', mk, ARGV[a + 7])
    redis.call('ZADD', KEYS[1], 'NX', ARGV[a + 6], id)
    redis.call('HINCRBY', KEYS[3], cv, 1)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'op', 'put', 'id', id)
  end
  out[#out + 1] = status
  out[#out + 1] = version
end
return out
"""

DELETE = r"""
local maxlen = ARGV[1]
local n = tonumber(ARGV[2])
local out = {}
for i = 0, n - 1 do
  local dk = KEYS[4 + 2 * i]
  local mk = KEYS[5 + 2 * i]
  local id = ARGV[3 + i]
  local cv = redis.call('HGET', dk, 'cv')
  if cv then
    redis.call('DEL', dk, mk)
    redis.call('ZREM', KEYS[1], id)
    if redis.call('HINCRBY', KEYS[3], cv, -1) <= 0 then redis.call('HDEL', KEYS[3], cv) end
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'op', 'delete', 'id', id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# Re-compression (reindex): replace a memory only if the document's text is still the one that
# was compressed (content hash check), so a concurrent edit is never paired with a stale memory.
UPDATE_MEMORY = r"""
local cv = ARGV[1]
local maxlen = ARGV[2]
local n = tonumber(ARGV[3])
local out = {}
for i = 0, n - 1 do
  local dk = KEYS[4 + 2 * i]
  local mk = KEYS[5 + 2 * i]
  local a = 4 + 3 * i
  local id, h = ARGV[a], ARGV[a + 1]
  local old = redis.call('HMGET', dk, 'hash', 'cv')
  if not old[1] then
    out[#out + 1] = 'gone'
  elseif old[1] ~= h then
    out[#out + 1] = 'changed'
  else
    redis.call('SET', mk, ARGV[a + 2])
    if old[2] ~= cv then
      redis.call('HSET', dk, 'cv', cv)
      if redis.call('HINCRBY', KEYS[3], old[2], -1) <= 0 then redis.call('HDEL', KEYS[3], old[2]) end
      redis.call('HINCRBY', KEYS[3], cv, 1)
    end
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'op', 'put', 'id', id)
    out[#out + 1] = 'updated'
  end
end
return out
"""
