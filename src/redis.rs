//! Redis pool. Built without connecting: the server starts while Redis is away and
//! bb8 reconnects as soon as it is back. Nothing durable depends on Redis.
use std::time::Duration;

use bb8_redis::RedisConnectionManager;

pub type RedisPool = bb8::Pool<RedisConnectionManager>;

pub fn pool(url: &str) -> Result<RedisPool, String> {
    let manager =
        RedisConnectionManager::new(url).map_err(|e| format!("invalid REDIS_URL: {e}"))?;
    Ok(bb8::Pool::builder()
        .max_size(16)
        .min_idle(Some(1))
        .connection_timeout(Duration::from_secs(2))
        .build_unchecked(manager))
}

pub async fn ping(pool: &RedisPool) -> Result<(), String> {
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    let pong: String = redis::cmd("PING")
        .query_async(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    if pong == "PONG" {
        Ok(())
    } else {
        Err(format!("unexpected PING reply {pong:?}"))
    }
}
