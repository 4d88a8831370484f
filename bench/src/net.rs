//! Client connections: loopback-only targets, client sockets bound to spread
//! source addresses, HTTP/1.1 keep-alive connections and WebSockets.
//!
//! Every connection the benchmark opens goes through [`Target::parse`], which
//! refuses anything but a loopback address: this tool generates load only
//! against servers on the same machine.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// One server the benchmark talks to: `http://127.0.0.1:PORT` or `ws://…`.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` for the `Host` header and the WebSocket URL.
    pub authority: String,
}

impl Target {
    /// Parses a base URL; only loopback hosts are accepted.
    pub fn parse(raw: &str) -> anyhow::Result<Target> {
        let url = url::Url::parse(raw).with_context(|| format!("invalid URL {raw:?}"))?;
        let host = url
            .host_str()
            .with_context(|| format!("URL {raw:?} has no host"))?;
        let ip: IpAddr = match host {
            "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            other => other
                .trim_matches(|c| c == '[' || c == ']')
                .parse()
                .with_context(|| format!("{raw:?}: the host must be a loopback IP address"))?,
        };
        if !ip.is_loopback() {
            bail!(
                "{raw:?} is not a loopback address; this benchmark only targets servers on this machine"
            );
        }
        let port = url
            .port_or_known_default()
            .with_context(|| format!("URL {raw:?} has no port"))?;
        let addr = SocketAddr::new(ip, port);
        Ok(Target {
            addr,
            authority: addr.to_string(),
        })
    }

    pub fn parse_all(raws: &[String]) -> anyhow::Result<Vec<Target>> {
        raws.iter().map(|r| Target::parse(r)).collect()
    }
}

/// Source addresses 127.0.0.`base` .. 127.0.0.`base+count-1`, handed out round
/// robin. Spreading client sockets over several source addresses multiplies the
/// ephemeral ports available towards one server port (and keeps TIME_WAIT
/// sockets of one scenario out of the next one's way).
#[derive(Debug)]
pub struct Sources {
    addrs: Vec<Ipv4Addr>,
    next: AtomicUsize,
}

impl Sources {
    /// `count == 0` means "let the kernel choose" (127.0.0.1).
    pub fn new(base: u8, count: u8) -> anyhow::Result<Sources> {
        if count > 0 && (base == 0 || u16::from(base) + u16::from(count) > 256) {
            bail!("source addresses 127.0.0.{base} + {count} do not fit in 127.0.0.1..127.0.0.255");
        }
        let addrs = (0..count)
            .map(|i| Ipv4Addr::new(127, 0, 0, base + i))
            .collect();
        Ok(Sources {
            addrs,
            next: AtomicUsize::new(0),
        })
    }

    pub fn pick(&self) -> Option<Ipv4Addr> {
        if self.addrs.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.addrs[i % self.addrs.len()])
    }
}

/// A TCP connection to `target`, bound to `source` when given (IPv4 targets).
pub async fn connect(target: SocketAddr, source: Option<Ipv4Addr>) -> std::io::Result<TcpStream> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let (Some(ip), true) = (source, target.is_ipv4()) {
        // Lets the kernel reuse a local port whose previous connection is still in
        // TIME_WAIT; the 4-tuple stays unique because the peer differs or moved on.
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One HTTP/1.1 keep-alive connection; requests on it are sequential.
pub struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
    authority: String,
    /// The last reply said `Connection: close`.
    closing: bool,
}

/// The server closed this keep-alive connection; nothing was sent.
#[derive(Debug)]
pub struct ConnectionClosed;

impl std::fmt::Display for ConnectionClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server closed the keep-alive connection")
    }
}

impl std::error::Error for ConnectionClosed {}

/// Upper bound for a single request, so that no worker can hang forever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

impl HttpConn {
    pub async fn open(target: &Target, source: Option<Ipv4Addr>) -> anyhow::Result<HttpConn> {
        let stream = tokio::time::timeout(REQUEST_TIMEOUT, connect(target.addr, source))
            .await
            .context("connect timed out")?
            .with_context(|| format!("connecting to {}", target.addr))?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        // The connection task ends when the sender is dropped or the peer closes.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(HttpConn {
            sender,
            authority: target.authority.clone(),
            closing: false,
        })
    }

    /// Sends one request and reads the whole body. A connection the server has
    /// closed (after `Connection: close`, e.g. Nginx's `keepalive_requests`)
    /// fails with [`ConnectionClosed`] before anything is sent, so the request
    /// is safe to send again on a new connection.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        json: Option<Bytes>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        if self.closing || self.sender.is_closed() || self.sender.ready().await.is_err() {
            return Err(ConnectionClosed.into());
        }
        let exchange = async {
            let mut builder = Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, &self.authority);
            if json.is_some() {
                builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
            }
            let request = builder
                .body(Full::new(json.unwrap_or_default()))
                .context("building request")?;
            let response = match self.sender.try_send_request(request).await {
                Ok(response) => response,
                // The request came back unsent: the connection was closing
                // (a `Connection: close` reply raced with this request).
                Err(err) if err.message().is_some() => return Err(ConnectionClosed.into()),
                Err(err) => {
                    return Err(anyhow::Error::new(err.into_error()).context("sending request"));
                }
            };
            let status = response.status();
            let closing = response
                .headers()
                .get_all(hyper::header::CONNECTION)
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            let body = response
                .into_body()
                .collect()
                .await
                .context("reading body")?
                .to_bytes();
            Ok((status, body, closing))
        };
        let (status, body, closing) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .context("request timed out")??;
        self.closing = closing;
        Ok((status, body))
    }

    pub async fn get(&mut self, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
        self.request(Method::GET, path, None).await
    }
}

/// Percent-encodes a room key for a URL path.
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The room as `GET /api/roulette/{key}` reports it.
#[derive(Debug, Deserialize)]
pub struct RoomReply {
    pub history: Vec<serde_json::Value>,
    pub version: u64,
}

pub async fn read_room(conn: &mut HttpConn, key: &str) -> anyhow::Result<RoomReply> {
    let (status, body) = conn
        .get(&format!("/api/roulette/{}", encode_key(key)))
        .await?;
    if status != StatusCode::OK {
        bail!(
            "reading room {key}: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    serde_json::from_slice(&body).context("decoding the room")
}

pub type Ws = WebSocketStream<TcpStream>;

/// Connects and joins `key`, retrying a refused or failed attempt a few times
/// (a burst of handshakes can overflow the server's accept queue). Returns the
/// stream and the room version from its `sync`, or the last error.
pub async fn open_member(
    target: &Target,
    sources: &Sources,
    key: &str,
    attempts: u32,
) -> Result<(Ws, u64), String> {
    let mut last_error = String::new();
    for attempt in 0..attempts.max(1) {
        let outcome = async {
            let mut ws = ws_connect(target, sources.pick()).await?;
            let version = join(&mut ws, key, JOIN_TIMEOUT).await?;
            anyhow::Ok((ws, version))
        }
        .await;
        match outcome {
            Ok(joined) => return Ok(joined),
            Err(err) => last_error = format!("{err:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200 * (u64::from(attempt) + 1))).await;
    }
    Err(last_error)
}

/// How long a `join` may wait for its `sync`.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Small buffers: the benchmark holds tens of thousands of these.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Opens a WebSocket to `target`'s `/ws`.
pub async fn ws_connect(target: &Target, source: Option<Ipv4Addr>) -> anyhow::Result<Ws> {
    let stream = connect(target.addr, source)
        .await
        .with_context(|| format!("connecting to {}", target.addr))?;
    let url = format!("ws://{}/ws", target.authority);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config()))
        .await
        .context("WebSocket handshake")?;
    Ok(ws)
}

/// The fields of a server frame the benchmark looks at.
#[derive(Debug, Deserialize)]
pub struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    pub key: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(default, borrow)]
    pub id: Option<std::borrow::Cow<'a, str>>,
}

pub fn json_text(value: &serde_json::Value) -> Message {
    Message::text(value.to_string())
}

/// Sends `join` (dialect v2, version 0) and waits for the room's `sync`;
/// returns the room's version. Frames for other rooms are skipped.
pub async fn join(ws: &mut Ws, key: &str, limit: Duration) -> anyhow::Result<u64> {
    ws.send(json_text(
        &serde_json::json!({"type": "join", "key": key, "version": 0}),
    ))
    .await
    .context("sending join")?;
    let wait = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let frame: Frame = serde_json::from_str(&text).context("decoding a frame")?;
                    match frame.kind.as_ref() {
                        "sync" if frame.key.as_deref() == Some(key) => {
                            return Ok(frame.version.unwrap_or(0));
                        }
                        "error" | "authRequired" => bail!("join {key} refused: {text}"),
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(close))) => bail!("closed while joining: {close:?}"),
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(err).context("reading while joining"),
                None => bail!("connection ended while joining"),
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .context("no sync after join")?
}
