//! Operator tooling for tests: `psql`, the repository's `scripts/*.sh`, and raw
//! Redis commands — the same tools an operator uses, run against the test servers.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PSQL: &str = "/usr/bin/psql";

/// Runs SQL with `psql` (`ON_ERROR_STOP`, unaligned tuples-only output) and
/// returns stdout; panics with stderr when psql fails.
pub fn psql(url: &str, sql: &str) -> String {
    assert!(
        Path::new(PSQL).exists(),
        "{PSQL} not found: install the Debian package `postgresql-client`"
    );
    let output = Command::new(PSQL)
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .output()
        .expect("running psql");
    assert!(
        output.status.success(),
        "psql failed on {sql:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Runs `sh scripts/<name> args...` from the repository with only `env` (plus
/// PATH) in its environment, so no ambient PG* variable can change its target.
pub fn run_script(name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name);
    assert!(script.is_file(), "{} not found", script.display());
    let mut command = Command::new("sh");
    command
        .arg(&script)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        command.env(k, v);
    }
    command
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()))
}

/// Sends one command to the Redis server on `port` (RESP over a fresh
/// connection) and returns the first line of the reply, e.g. `+OK` or `:3`.
pub async fn redis_command(port: u16, args: &[&str]) -> String {
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while !reply.ends_with(b"\r\n") {
            if stream.read(&mut byte).await? == 0 {
                break;
            }
            reply.push(byte[0]);
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&reply).trim_end().to_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("Redis did not answer {args:?} within 10 s"))
        .unwrap_or_else(|e| panic!("Redis command {args:?} failed: {e}"))
}
