//! The Lua scripts that change an address atomically (run with EVALSHA, loaded on demand).

use std::sync::LazyLock;

use redis::Script;

/// Publishes one key.
///
/// KEYS: cur, ver, hist, pub, index, tombstone of the key's fingerprint. ARGV: address,
/// publication id, key (base64 as in the record JSON), record JSON without its `version` field,
/// `1` or `0` (whether the caller read a tombstone), the tombstone it read, the tombstone to
/// write (empty: none), the current version the publication expects (empty: any; `0`: none).
/// Returns `{status, payload}`: `published` or `unchanged` with the record JSON, `retry` when
/// the tombstone changed since the caller read it (the caller merges again), `conflict` with
/// the current version (`0`: none) when it is not the expected one, or `corrupt` with a
/// description.
pub(crate) static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local address, pubid, key, body = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local tomb = redis.call('GET', KEYS[6])
if (tomb and (ARGV[5] ~= '1' or tomb ~= ARGV[6])) or (not tomb and ARGV[5] == '1') then
  return {'retry', ''}
end
if ARGV[7] ~= '' then redis.call('SET', KEYS[6], ARGV[7]) end
local earlier = redis.call('HGET', KEYS[4], pubid)
if earlier then
  local rec = redis.call('HGET', KEYS[3], earlier)
  if rec then return {'unchanged', rec} end
  return {'corrupt', 'publication id ' .. pubid .. ' maps to version ' .. earlier .. ', which is not in the history'}
end
local version = 0
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, decoded = pcall(cjson.decode, cur)
  if not ok or type(decoded) ~= 'table' then
    return {'corrupt', 'the current record is not a JSON object'}
  end
  if decoded['key'] == key then return {'unchanged', cur} end
  version = tonumber(redis.call('GET', KEYS[2]))
  if version == nil or version < 1 or version >= 9007199254740991 then
    return {'corrupt', 'the version counter is missing or invalid'}
  end
end
if ARGV[8] ~= '' and ARGV[8] ~= string.format('%d', version) then
  return {'conflict', string.format('%d', version)}
end
local v = string.format('%d', version + 1)
local rec = '{"version":' .. v .. ',' .. string.sub(body, 2)
redis.call('SET', KEYS[1], rec)
redis.call('SET', KEYS[2], v)
redis.call('HSET', KEYS[3], v, rec)
redis.call('HSET', KEYS[4], pubid, v)
redis.call('ZADD', KEYS[5], 0, address)
return {'published', rec}
"#,
    )
});

/// Deletes an address. KEYS: cur, ver, hist, pub, index. ARGV: address. Returns how many keys
/// and index entries were removed.
pub(crate) static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return n + redis.call('ZREM', KEYS[5], ARGV[1])
"#,
    )
});

/// Replaces the history of an address. KEYS: cur, ver, hist, pub, index. ARGV: address, then
/// (version, publication id, record JSON) per record, oldest first. The first record of a
/// publication id wins its idempotency entry.
pub(crate) static RESTORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local v, rec
for i = 2, #ARGV, 3 do
  v, rec = ARGV[i], ARGV[i + 2]
  redis.call('HSET', KEYS[3], v, rec)
  redis.call('HSETNX', KEYS[4], ARGV[i + 1], v)
end
redis.call('SET', KEYS[1], rec)
redis.call('SET', KEYS[2], v)
redis.call('ZADD', KEYS[5], 0, ARGV[1])
return 1
"#,
    )
});
