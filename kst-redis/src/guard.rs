//! The durability guard (`appendonly yes` + `appendfsync always` on every primary, read with
//! `CONFIG GET`), `check` and `topology`.

use std::sync::atomic::{AtomicBool, Ordering};

use kst_core::{Error, Result};
use redis::Value;

use crate::conn::Conn;
use crate::error::{COMPONENT, redis};
use crate::store::RedisStore;

/// What the guard requires and what it saw last.
#[derive(Debug)]
pub(crate) struct Guard {
    /// `[store] require_durable`: refuse when `CONFIG GET` cannot be read.
    pub(crate) require: bool,
    /// Whether the guard runs at all: off only for a server that holds soft state (the
    /// counters of [`crate::RedisCounters`]), never for a key store.
    pub(crate) enabled: bool,
    /// Whether the last check passed (publications run the check again until it does).
    passed: AtomicBool,
}

/// The durability settings of one primary.
#[derive(Debug, Clone)]
pub(crate) struct Durability {
    /// `host:port` of the primary (empty when the deployment does not say).
    pub(crate) node: String,
    /// `appendonly`, `appendfsync`; `None` when `CONFIG GET` cannot be read.
    pub(crate) settings: Option<(String, String)>,
}

impl Durability {
    fn durable(&self) -> bool {
        matches!(&self.settings, Some((a, f)) if a == "yes" && f == "always")
    }
}

impl Guard {
    pub(crate) fn new(require: bool) -> Guard {
        Guard {
            require,
            enabled: true,
            passed: AtomicBool::new(false),
        }
    }

    /// No guard: for a server that holds only soft state ([`crate::RedisCounters`]).
    pub(crate) fn off() -> Guard {
        Guard {
            require: false,
            enabled: false,
            passed: AtomicBool::new(true),
        }
    }

    /// Runs the check unless it passed before (for every publication).
    pub(crate) async fn ensure(&self, store: &RedisStore) -> Result<()> {
        if self.passed.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.check(store).await
    }

    /// Reads the settings of every primary and fails unless each is durable, or cannot be read
    /// and durability is not required.
    pub(crate) async fn check(&self, store: &RedisStore) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let nodes = durability(&store.conn).await?;
        let mut problems = Vec::new();
        for n in &nodes {
            let node = if n.node.is_empty() {
                "the server"
            } else {
                n.node.as_str()
            };
            match &n.settings {
                _ if n.durable() => {}
                Some((a, f)) => problems.push(format!(
                    "{node} runs with appendonly {a}, appendfsync {f}: a confirmed key can be \
                     lost when Redis restarts; set `appendonly yes` and `appendfsync always` \
                     (redis.conf, or CONFIG SET and CONFIG REWRITE)"
                )),
                None if self.require => problems.push(format!(
                    "{node} does not answer CONFIG GET appendonly/appendfsync (a renamed or \
                     forbidden CONFIG command?), so kst cannot tell whether it keeps what it \
                     confirms; make CONFIG GET readable, or set [store] require_durable = false \
                     after checking by hand that it runs with appendonly yes and appendfsync always"
                )),
                None => tracing::warn!(
                    node,
                    "Redis does not answer CONFIG GET; serving anyway because [store] require_durable = false"
                ),
            }
        }
        if problems.is_empty() {
            self.passed.store(true, Ordering::Relaxed);
            return Ok(());
        }
        self.passed.store(false, Ordering::Relaxed);
        Err(Error::Config(format!(
            "{COMPONENT}: Redis is not durable, kst refuses to serve: {}",
            problems.join("; ")
        )))
    }
}

/// `CONFIG GET` of one parameter on every primary: node and value (`None`: unreadable).
async fn config_get(conn: &Conn, name: &str) -> Result<Vec<(String, Option<String>)>> {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET").arg(name);
    let answers = match conn.on_primaries(&cmd).await {
        Ok(a) => a,
        Err(e) if is_refusal(&e) => return Ok(vec![(String::new(), None)]),
        Err(e) => return Err(redis(e)),
    };
    Ok(answers
        .into_iter()
        .map(|(node, v)| (node, config_value(v, name)))
        .collect())
}

/// Whether an error says the command is not available (renamed, forbidden by an ACL).
fn is_refusal(e: &redis::RedisError) -> bool {
    matches!(e.code(), Some("ERR" | "NOPERM"))
}

/// The value of `name` in a `CONFIG GET` answer (an array or a map of name and value).
fn config_value(v: Value, name: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = match v {
        Value::Map(m) => m
            .into_iter()
            .filter_map(|(k, v)| {
                Some((
                    redis::from_redis_value(k).ok()?,
                    redis::from_redis_value(v).ok()?,
                ))
            })
            .collect(),
        Value::Array(items) => {
            let strings: Vec<String> = items
                .into_iter()
                .filter_map(|v| redis::from_redis_value(v).ok())
                .collect();
            strings
                .chunks(2)
                .filter_map(|c| Some((c.first()?.clone(), c.get(1)?.clone())))
                .collect()
        }
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// The durability settings of every primary.
pub(crate) async fn durability(conn: &Conn) -> Result<Vec<Durability>> {
    let appendonly = config_get(conn, "appendonly").await?;
    let appendfsync = config_get(conn, "appendfsync").await?;
    Ok(appendonly
        .into_iter()
        .map(|(node, a)| {
            let f = appendfsync
                .iter()
                .find(|(n, _)| *n == node)
                .and_then(|(_, f)| f.clone());
            Durability {
                node,
                settings: a.zip(f),
            }
        })
        .collect())
}

/// Role of a `ROLE` answer (`master`, `slave`, `sentinel`).
fn role_of(v: &Value) -> Option<String> {
    match v {
        Value::Array(items) => match items.first() {
            Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            Some(Value::SimpleString(s)) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// `connected_slaves:<n>` of an `INFO replication` answer.
fn connected_replicas(v: Value) -> Option<u64> {
    let text: String = redis::from_redis_value(v).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("connected_slaves:"))
        .and_then(|n| n.trim().parse().ok())
}

impl RedisStore {
    /// `check`: every primary answers `ROLE` with `master`, and the durability guard holds.
    pub(crate) async fn check_inner(&self) -> Result<()> {
        let roles = self.conn.on_primaries(&redis::cmd("ROLE")).await;
        let roles = match roles {
            Ok(r) => r,
            Err(e) => {
                self.conn.on_error(&e).await;
                return Err(redis(e));
            }
        };
        for (node, role) in &roles {
            if role_of(role).as_deref() != Some("master") {
                // Under Sentinel, a demoted primary: ask the sentinels again.
                let e = redis::RedisError::from((
                    redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                    "connected to a replica",
                ));
                self.conn.on_error(&e).await;
                return Err(Error::unavailable(
                    COMPONENT,
                    format!(
                        "connected to a replica{}, not the primary",
                        if node.is_empty() {
                            String::new()
                        } else {
                            format!(" ({node})")
                        }
                    ),
                ));
            }
        }
        self.guard.check(self).await
    }

    /// `topology`: deployment, primaries in use, their role, durability settings and
    /// connected replicas (on a cluster: the fewest of any shard), `min_replicas`.
    pub(crate) async fn topology_inner(&self) -> Result<Vec<(String, String)>> {
        let mode = match &self.conn {
            Conn::Single(..) => "single",
            Conn::Sentinel(_) => "sentinel",
            Conn::Cluster(_) => "cluster",
        };
        let roles = self
            .conn
            .on_primaries(&redis::cmd("ROLE"))
            .await
            .map_err(redis)?;
        let mut info = redis::cmd("INFO");
        info.arg("replication");
        let infos = self.conn.on_primaries(&info).await.map_err(redis)?;
        let durability = durability(&self.conn).await?;
        let join = |values: Vec<String>| {
            let mut v = values;
            v.dedup();
            v.join(",")
        };
        let mut out = vec![("redis_mode".to_string(), mode.to_string())];
        let primaries: Vec<String> = roles.iter().map(|(n, _)| n.clone()).collect();
        if primaries.iter().any(|p| !p.is_empty()) {
            out.push(("redis_primary".into(), primaries.join(",")));
        }
        out.push((
            "redis_role".into(),
            join(
                roles
                    .iter()
                    .map(|(_, r)| role_of(r).unwrap_or_else(|| "unknown".into()))
                    .collect(),
            ),
        ));
        let setting = |i: usize| {
            join(
                durability
                    .iter()
                    .map(|d| match &d.settings {
                        Some(s) => {
                            if i == 0 {
                                s.0.clone()
                            } else {
                                s.1.clone()
                            }
                        }
                        None => "unreadable".into(),
                    })
                    .collect(),
            )
        };
        out.push(("redis_appendonly".into(), setting(0)));
        out.push(("redis_appendfsync".into(), setting(1)));
        let replicas = infos
            .into_iter()
            .map(|(_, v)| connected_replicas(v))
            .collect::<Option<Vec<u64>>>()
            .and_then(|v| v.into_iter().min());
        out.push((
            "redis_connected_replicas".into(),
            replicas.map_or_else(|| "unknown".into(), |n| n.to_string()),
        ));
        out.push(("redis_min_replicas".into(), self.min_replicas.to_string()));
        out.push((
            "redis_require_durable".into(),
            match self.guard.enabled {
                true => self.guard.require.to_string(),
                false => "off (soft state)".into(),
            },
        ));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_answers_in_both_protocols() {
        let resp2 = Value::Array(vec![
            Value::BulkString(b"appendonly".to_vec()),
            Value::BulkString(b"yes".to_vec()),
        ]);
        assert_eq!(config_value(resp2, "appendonly").as_deref(), Some("yes"));
        let resp3 = Value::Map(vec![(
            Value::BulkString(b"appendfsync".to_vec()),
            Value::BulkString(b"always".to_vec()),
        )]);
        assert_eq!(
            config_value(resp3, "appendfsync").as_deref(),
            Some("always")
        );
        assert_eq!(config_value(Value::Array(vec![]), "appendonly"), None);
    }

    #[test]
    fn replica_counts_from_info() {
        let info =
            Value::BulkString(b"# Replication\r\nrole:master\r\nconnected_slaves:2\r\n".to_vec());
        assert_eq!(connected_replicas(info), Some(2));
    }
}
