//! The Lua scripts that change an address atomically (run with EVALSHA, loaded on demand).
//!
//! Each script touches the keys of one address only (one hash tag, one hash slot), so it runs
//! on a Redis Cluster too, except [`GET_SERVED`], which reads a tombstone besides and runs
//! only when the store is not a cluster. What lives in other slots (the tombstone of a fingerprint, the
//! look-up index, the address listing) is written by the caller around the script, in the
//! order the crate documentation ("Write order") gives.

use std::sync::LazyLock;

use redis::Script;

/// Publishes one key.
///
/// KEYS: cur, ver, hist, pub, deleted (one hash tag). ARGV: publication id, key (base64 as in the record
/// JSON), record JSON without its `version` field, `1` when the caller publishes again a key
/// whose tombstone grew after its first attempt (*supersede*: a publication id already seen
/// does not short-circuit while its version is still the current one, so the merged key
/// replaces the one written without the revocation), else `0`; the current version the
/// publication expects (empty: any; `0`: none; not checked again when superseding its own
/// version, which passed the check when it was written).
///
/// Returns `{status, payload, previous}`: `published` or `unchanged` with the record JSON and
/// the JSON of the current record it replaced (empty: none or not replaced), `deleted` (empty
/// payload) when the publication id is not in the history but in the `deleted` set (a
/// redelivery after a deletion; nothing written), `conflict` with
/// the current version (`0`: none) when it is not the expected one, or `corrupt` with a
/// description.
pub(crate) static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local pubid, key, body, supersede = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'
local function published_earlier(earlier)
  local rec = redis.call('HGET', KEYS[3], earlier)
  if rec then return {'unchanged', rec, ''} end
  return {'corrupt', 'publication id ' .. pubid .. ' maps to version ' .. earlier .. ', which is not in the history', ''}
end
local earlier = redis.call('HGET', KEYS[4], pubid)
if earlier and not supersede then return published_earlier(earlier) end
if not earlier and redis.call('SISMEMBER', KEYS[5], pubid) == 1 then return {'deleted', '', ''} end
local version = 0
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, decoded = pcall(cjson.decode, cur)
  if not ok or type(decoded) ~= 'table' then
    return {'corrupt', 'the current record is not a JSON object', ''}
  end
  if decoded['key'] == key then return {'unchanged', cur, ''} end
  version = tonumber(redis.call('GET', KEYS[2]))
  if version == nil or version < 1 or version >= 9007199254740991 then
    return {'corrupt', 'the version counter is missing or invalid', ''}
  end
end
if earlier and tonumber(earlier) ~= version then return published_earlier(earlier) end
if ARGV[5] ~= '' and not earlier and ARGV[5] ~= string.format('%d', version) then
  return {'conflict', string.format('%d', version), ''}
end
local v = string.format('%d', version + 1)
local rec = '{"version":' .. v .. ',' .. string.sub(body, 2)
redis.call('SET', KEYS[1], rec)
redis.call('SET', KEYS[2], v)
redis.call('HSET', KEYS[3], v, rec)
redis.call('HSET', KEYS[4], pubid, v)
return {'published', rec, cur or ''}
"#,
    )
});

/// Deletes an address. KEYS: cur, ver, hist, pub, deleted. Adds every publication id of the
/// history (the fields of `pub`) to `deleted`, then removes the rest. Returns `{removed keys,
/// previous current record JSON or ''}`.
pub(crate) static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
local ids = redis.call('HKEYS', KEYS[4])
for i = 1, #ids, 1000 do
  redis.call('SADD', KEYS[5], unpack(ids, i, math.min(i + 999, #ids)))
end
local n = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return {n, cur or ''}
"#,
    )
});

/// Replaces the history of an address. KEYS: cur, ver, hist, pub. ARGV: (version, publication
/// id, record JSON) per record, oldest first. The first record of a publication id wins its
/// idempotency entry. Returns the previous current record JSON (empty: none).
pub(crate) static RESTORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local previous = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local v, rec
for i = 1, #ARGV, 3 do
  v, rec = ARGV[i], ARGV[i + 2]
  redis.call('HSET', KEYS[3], v, rec)
  redis.call('HSETNX', KEYS[4], ARGV[i + 1], v)
end
redis.call('SET', KEYS[1], rec)
redis.call('SET', KEYS[2], v)
return previous or ''
"#,
    )
});

/// Compare-and-set of a tombstone. KEYS: the tombstone. ARGV: `1` or `0` (whether the caller
/// read one), the tombstone it read, the tombstone to write. Returns 1 when written, 0 when the
/// tombstone changed since it was read (the caller merges again).
pub(crate) static TOMBSTONE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local tomb = redis.call('GET', KEYS[1])
if (tomb and (ARGV[1] ~= '1' or tomb ~= ARGV[2])) or (not tomb and ARGV[1] == '1') then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3])
return 1
"#,
    )
});

/// Reads the served record of an address in one round trip on one server (or the primary
/// Sentinel names): the current record and the tombstone of its fingerprint. Not on a Redis
/// Cluster: the tombstone lives in its fingerprint's slot, which a script on the address' slot
/// must not touch (the store sends two GETs there).
///
/// KEYS: cur. ARGV: the tombstone key prefix (`P` `tombstone:`).
///
/// Returns `{}` when the address has no current record, else `{record, fingerprint,
/// tombstone}`: the fingerprint the tombstone was read for (taken from the record's
/// `"fingerprint":"<hex>"` member, which a JSON string can never contain unescaped; empty when
/// there is none) and the tombstone (empty when there is none). The caller checks
/// that fingerprint against the record it parses.
pub(crate) static GET_SERVED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return {} end
local fpr = string.match(cur, '"fingerprint":"(%x+)"')
if not fpr then return {cur, '', ''} end
local tomb = redis.call('GET', ARGV[1] .. fpr)
return {cur, fpr, tomb or ''}
"#,
    )
});

/// [`GET_SERVED`] for many addresses in one round trip (the web listener's read batches), on
/// one server (or the primary Sentinel names); not on a Redis Cluster, where the addresses
/// live in many slots.
///
/// KEYS: the cur key of each address. ARGV: the tombstone key prefix (`P` `tombstone:`).
///
/// Returns one array per key, in the order of KEYS, each what [`GET_SERVED`] returns for it.
pub(crate) static GET_MANY_SERVED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
for i, key in ipairs(KEYS) do
  local cur = redis.call('GET', key)
  if not cur then
    out[i] = {}
  else
    local fpr = string.match(cur, '"fingerprint":"(%x+)"')
    if not fpr then
      out[i] = {cur, '', ''}
    else
      out[i] = {cur, fpr, redis.call('GET', ARGV[1] .. fpr) or ''}
    end
  end
end
return out
"#,
    )
});
