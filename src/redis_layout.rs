//! The three ways croupier reaches Redis — one server, a Sentinel-managed
//! master, a Redis Cluster — and what differs between them: the `REDIS_URL`
//! forms, and the names of room channels and room cache keys.
//!
//! URL forms (the short forms are turned into fred's native ones here, so
//! both are accepted):
//!
//! | deployment | `REDIS_URL` |
//! |---|---|
//! | one server | `redis://[user:password@]host[:port][/db]`, `rediss://…` for TLS |
//! | Sentinel | `redis-sentinel://[user:password@]host:port[,host:port…]/<service name>` or fred's `redis-sentinel://host:port?sentinelServiceName=<name>[&node=host:port…]` |
//! | Cluster | `redis-cluster://[user:password@]host:port[,host:port…]` (one seed node is enough) or fred's `redis-cluster://host:port?node=host:port…` |
//!
//! TLS to Sentinel or Cluster (`rediss-sentinel://`, `rediss-cluster://`) is
//! refused: croupier's certificate handling is built and tested for a single
//! endpoint only.
//!
//! Names: on one server or behind Sentinel, a room's channel is
//! `croupier:room:<key>` and its cache entry `croupier:cache:room:<key>` (as
//! before Cluster support, so a rolling upgrade keeps its cache and its
//! instances keep hearing each other). In a Cluster both carry the room's hash
//! tag, `croupier:{room:<escaped key>}:events` and `…:cache`, so a room's
//! sharded channel and its cache entry live on the same shard while rooms
//! spread over all shards. The key is escaped (`%` → `%25`, `{` → `%7B`,
//! `}` → `%7D`) so that the tag is exactly the room, whatever braces its
//! key contains.

use crate::domain::RoomKey;

/// How the Redis deployment is reached, which decides names and commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One server, or the master a Sentinel names: plain pub/sub.
    Single,
    /// Redis Cluster: sharded pub/sub for rooms, hash-tagged keys, `SCAN` on
    /// every master.
    Cluster,
}

impl Layout {
    /// The layout a `REDIS_URL` selects.
    pub fn of_url(url: &str) -> Layout {
        if url.starts_with("redis-cluster://") {
            Layout::Cluster
        } else {
            Layout::Single
        }
    }

    /// The channel a room's events travel on.
    pub fn room_channel(self, key: &RoomKey) -> String {
        match self {
            Layout::Single => format!("croupier:room:{key}"),
            Layout::Cluster => format!("croupier:{}:events", room_tag(key)),
        }
    }

    /// The cache entry (a hash) of a room.
    pub fn cache_key(self, key: &RoomKey) -> String {
        match self {
            Layout::Single => format!("croupier:cache:room:{key}"),
            Layout::Cluster => format!("croupier:{}:cache", room_tag(key)),
        }
    }

    /// A `SCAN` pattern matching every room cache entry.
    pub fn cache_pattern(self) -> &'static str {
        match self {
            Layout::Single => "croupier:cache:room:*",
            Layout::Cluster => "croupier:{room:*}:cache",
        }
    }
}

/// `{room:<escaped key>}`: the hash tag every per-room name carries in a Cluster.
fn room_tag(key: &RoomKey) -> String {
    let mut tag = String::with_capacity(key.as_str().len() + 7);
    tag.push_str("{room:");
    for c in key.as_str().chars() {
        match c {
            '%' => tag.push_str("%25"),
            '{' => tag.push_str("%7B"),
            '}' => tag.push_str("%7D"),
            // SCAN patterns treat these as glob syntax; escaping keeps a
            // pattern built from a tag literal.
            '*' => tag.push_str("%2A"),
            '?' => tag.push_str("%3F"),
            '[' => tag.push_str("%5B"),
            ']' => tag.push_str("%5D"),
            '\\' => tag.push_str("%5C"),
            c => tag.push(c),
        }
    }
    tag.push('}');
    tag
}

/// Turns an accepted `REDIS_URL` into the form fred parses, or says in one
/// line what is wrong with it.
pub fn fred_url(url: &str) -> Result<String, String> {
    if url.starts_with("rediss-sentinel://") || url.starts_with("rediss-cluster://") {
        return Err(
            "TLS with Sentinel or Cluster (rediss-sentinel://, rediss-cluster://) is not supported; \
             use rediss:// to a single endpoint, or redis-sentinel:// / redis-cluster:// on a trusted network"
                .to_owned(),
        );
    }
    let converted = if let Some(rest) = url.strip_prefix("redis-cluster://") {
        cluster_url(rest)?
    } else if let Some(rest) = url.strip_prefix("redis-sentinel://") {
        sentinel_url(rest)?
    } else if url.starts_with("redis://") || url.starts_with("rediss://") {
        url.to_owned()
    } else {
        return Err(
            "must start with redis:// or rediss:// (one server), redis-sentinel:// (Sentinel) \
             or redis-cluster:// (Cluster)"
                .to_owned(),
        );
    };
    // The TLS settings of rediss:// are attached by the bus; parse it as plain
    // so that checking the URL does not depend on the system's CA store.
    let plain = converted
        .strip_prefix("rediss://")
        .map_or_else(|| converted.clone(), |rest| format!("redis://{rest}"));
    fred::types::config::Config::from_url(&plain).map_err(|e| format!("not a valid URL: {e}"))?;
    Ok(converted)
}

/// `[cred@]h:p[,h:p…][?query]` → `redis-cluster://[cred@]h:p[?node=h:p…]`.
fn cluster_url(rest: &str) -> Result<String, String> {
    let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = authority.trim_end_matches('/');
    if authority.contains('/') {
        return Err("redis-cluster:// takes no path (a Cluster has only database 0)".to_owned());
    }
    let (credentials, hosts) = split_credentials(authority);
    let nodes: Vec<&str> = hosts.split(',').map(str::trim).collect();
    for node in &nodes {
        check_host_port(node)?;
    }
    let mut extra: Vec<String> = nodes[1..].iter().map(|n| format!("node={n}")).collect();
    if !query.is_empty() {
        extra.push(query.to_owned());
    }
    let query = if extra.is_empty() {
        String::new()
    } else {
        format!("?{}", extra.join("&"))
    };
    Ok(format!("redis-cluster://{credentials}{}{query}", nodes[0]))
}

/// `[cred@]h:p[,h:p…]/<service>` → fred's `?sentinelServiceName=` form; a URL
/// already in fred's form is kept.
fn sentinel_url(rest: &str) -> Result<String, String> {
    if rest.contains("sentinelServiceName=") {
        return Ok(format!("redis-sentinel://{rest}"));
    }
    let (authority, service) = rest.split_once('/').ok_or(
        "redis-sentinel:// needs the service name: redis-sentinel://host:port[,host:port…]/<service name>",
    )?;
    let service = service.trim_end_matches('/');
    if service.is_empty() || service.contains(['/', '?', '&', '#', '=']) {
        return Err(format!(
            "{service:?} is not a Sentinel service name (redis-sentinel://host:port[,host:port…]/<service name>)"
        ));
    }
    let (credentials, hosts) = split_credentials(authority);
    let nodes: Vec<&str> = hosts.split(',').map(str::trim).collect();
    for node in &nodes {
        check_host_port(node)?;
    }
    let mut query = format!("sentinelServiceName={service}");
    for node in &nodes[1..] {
        query.push_str("&node=");
        query.push_str(node);
    }
    Ok(format!(
        "redis-sentinel://{credentials}{}?{query}",
        nodes[0]
    ))
}

/// (`user:password@` or empty, the host list).
fn split_credentials(authority: &str) -> (&str, &str) {
    match authority.rfind('@') {
        Some(at) => authority.split_at(at + 1),
        None => ("", authority),
    }
}

fn check_host_port(node: &str) -> Result<(), String> {
    let valid = node
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if valid {
        Ok(())
    } else {
        Err(format!("{node:?} is not host:port"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(raw: &str) -> RoomKey {
        RoomKey::parse(raw).unwrap()
    }

    #[test]
    fn short_forms_become_freds() {
        assert_eq!(
            fred_url("redis-cluster://10.0.0.1:7000").unwrap(),
            "redis-cluster://10.0.0.1:7000"
        );
        assert_eq!(
            fred_url("redis-cluster://u:p@a:7000,b:7001,c:7002").unwrap(),
            "redis-cluster://u:p@a:7000?node=b:7001&node=c:7002"
        );
        assert_eq!(
            fred_url("redis-sentinel://s1:26379,s2:26380/mymaster").unwrap(),
            "redis-sentinel://s1:26379?sentinelServiceName=mymaster&node=s2:26380"
        );
        let native = "redis-sentinel://s1:26379?sentinelServiceName=m&node=s2:26379";
        assert_eq!(fred_url(native).unwrap(), native);
        assert_eq!(fred_url("redis://r:6379/2").unwrap(), "redis://r:6379/2");
        assert_eq!(fred_url("rediss://r:6380").unwrap(), "rediss://r:6380");
    }

    #[test]
    fn bad_forms_get_one_line() {
        for bad in [
            "http://x",
            "redis-sentinel://s1:26379",
            "redis-sentinel://s1:26379/",
            "redis-sentinel://s1/m",
            "redis-cluster://",
            "redis-cluster://a:7000,b",
            "redis-cluster://a:7000/3",
            "rediss-cluster://a:7000",
            "rediss-sentinel://a:26379/m",
        ] {
            let err = fred_url(bad).unwrap_err();
            assert!(!err.contains('\n') && !err.is_empty(), "{bad}: {err}");
        }
    }

    #[test]
    fn cluster_names_carry_exactly_the_rooms_tag() {
        let layout = Layout::Cluster;
        assert_eq!(
            layout.room_channel(&room("t 1")),
            "croupier:{room:t 1}:events"
        );
        assert_eq!(layout.cache_key(&room("t 1")), "croupier:{room:t 1}:cache");
        // Braces in a key cannot end or open the tag early.
        let tricky = layout.cache_key(&room("a}b{c%"));
        assert_eq!(tricky, "croupier:{room:a%7Db%7Bc%25}:cache");
        assert_ne!(
            layout.cache_key(&room("a}x")),
            layout.cache_key(&room("a%7Dx"))
        );
        let single = Layout::Single;
        assert_eq!(single.room_channel(&room("r")), "croupier:room:r");
        assert_eq!(single.cache_key(&room("r")), "croupier:cache:room:r");
        assert_eq!(Layout::of_url("redis-cluster://a:1"), Layout::Cluster);
        assert_eq!(Layout::of_url("redis-sentinel://a:1/m"), Layout::Single);
    }
}
