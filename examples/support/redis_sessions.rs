//! Sessions in Redis: every instance of the demo app reads and counts visits in one shared Redis,
//! so any instance serves any session and removing one loses nothing.

use std::time::Duration;

use redis::aio::ConnectionManager;
use switchyard::demo::{SessionStore, StoreFuture};

/// How long a session no one visits lives, unless told otherwise; a demo should not fill a Redis.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);

/// Keeps the demo's keys apart from anything else in the same Redis.
const KEY_PREFIX: &str = "switchyard-demo:visits:";

/// Counts a visit only to a session that exists, in one round trip: a visit must not bring back a
/// session that expired, or it would look continuous when it was lost.
const VISIT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local visits = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return visits
";

/// A [`SessionStore`] in Redis, through a connection manager that reconnects by itself.
#[derive(Clone)]
pub struct RedisSessions {
    connection: ConnectionManager,
    visit: redis::Script,
    expiry_secs: u64,
}

impl RedisSessions {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`); fails if Redis does not answer now.
    /// Sessions expire after `expiry` without a visit.
    ///
    /// The manager's defaults bound each attempt (1 s to connect, 500 ms per command), so a Redis
    /// that goes away makes requests fail fast with 503 instead of hanging.
    pub async fn connect(url: &str, expiry: Duration) -> redis::RedisResult<RedisSessions> {
        let connection = redis::Client::open(url)?.get_connection_manager().await?;
        Ok(RedisSessions {
            connection,
            visit: redis::Script::new(VISIT),
            expiry_secs: expiry.as_secs().max(1),
        })
    }
}

fn key(id: &str) -> String {
    format!("{KEY_PREFIX}{id}")
}

impl SessionStore for RedisSessions {
    fn visit<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<u64>> {
        Box::pin(async move {
            // Clones share one multiplexed connection; the clone is only a handle.
            let mut connection = self.connection.clone();
            let visits: Option<u64> = self
                .visit
                .key(key(id))
                .arg(self.expiry_secs)
                .invoke_async(&mut connection)
                .await?;
            Ok(visits)
        })
    }

    fn create<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            redis::cmd("SET")
                .arg(key(id))
                .arg(1)
                .arg("EX")
                .arg(self.expiry_secs)
                .query_async::<()>(&mut connection)
                .await?;
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}
