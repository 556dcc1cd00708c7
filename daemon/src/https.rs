//! The TCP listener of the agent's and the orchestrator's HTTP APIs: TLS (rustls) with an
//! optional client certificate of the cluster CA, or plain HTTP for `--insecure` on loopback.
//!
//! [`ApiListener`]: TCP connections are accepted by a task of its own,
//! each handshake runs in a task with a deadline (a client that stalls in its handshake holds
//! up nobody), at most [`MAX_CONNECTIONS`] connections are open at once, and the server sees
//! each connection's [`Peer`] (address and certificate identity) as axum's `ConnectInfo`,
//! which the access layer ([`crate::auth`]) reads. [`serve`] runs HTTP/1.1 on
//! it with bounds axum's own `serve` does not set: a connection that does not send a whole
//! request head within [`HEADER_TIMEOUT`] (a slow client, or one idle between requests) is
//! closed, so nobody holds one of the connections by trickling bytes or by doing nothing.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use godwit_tls::rustls::ServerConfig;
use godwit_tls::Identity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Connections an API serves at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 512;
/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may take to send a request's head, or stay idle between requests.
/// Godwit's clients drop idle connections sooner ([`crate::client`]), so a request never
/// races the server closing its connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Header fields a request may carry.
pub const MAX_HEADERS: usize = 64;

/// Who is at the other end of an API connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The identity its client certificate names (verified against the cluster CA), if it
    /// presented one; always `None` on a plain connection.
    pub identity: Option<Identity>,
}

/// One accepted API connection: plain TCP or TLS. It holds its place among the
/// [`MAX_CONNECTIONS`] until it is dropped.
#[derive(Debug)]
pub struct ApiStream {
    io: Io,
    _permit: OwnedSemaphorePermit,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for ApiStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ApiStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An API's listening socket; see the module documentation.
#[derive(Debug)]
pub struct ApiListener {
    tls: bool,
    ready: mpsc::Receiver<(ApiStream, Peer)>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for ApiListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl ApiListener {
    /// Serves on `listener`: TLS with `tls`, else plain HTTP.
    pub fn new(listener: TcpListener, tls: Option<Arc<ServerConfig>>) -> Self {
        let (tx, ready) = mpsc::channel(64);
        let is_tls = tls.is_some();
        let acceptor = tokio::spawn(accept_loop(
            listener,
            tls.map(tokio_rustls::TlsAcceptor::from),
            tx,
        ));
        ApiListener {
            tls: is_tls,
            ready,
            acceptor,
        }
    }

    /// The next connection whose handshake completed.
    async fn accept(&mut self) -> (ApiStream, Peer) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept task ended (its socket failed for good): serve nothing more.
            None => std::future::pending().await,
        }
    }

    /// `https` or `http`: how clients reach this API.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ready: mpsc::Sender<(ApiStream, Peer)>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "cannot accept an API connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let ready = ready.clone();
        match &tls {
            None => {
                let stream = ApiStream {
                    io: Io::Plain(tcp),
                    _permit: permit,
                };
                let peer = Peer {
                    addr,
                    identity: None,
                };
                if ready.send((stream, peer)).await.is_err() {
                    return;
                }
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::warn!(peer = %addr, error = %e, "API connection refused: TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(peer = %addr, "API connection refused: no TLS handshake within 10 s");
                            return;
                        }
                    };
                    let identity = godwit_tls::peer_identity(tls.get_ref().1);
                    let stream = ApiStream {
                        io: Io::Tls(Box::new(tls)),
                        _permit: permit,
                    };
                    let _ = ready.send((stream, Peer { addr, identity })).await;
                });
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets the requests already
/// running finish (the caller bounds how long it waits). Each request sees its connection's
/// [`Peer`] as `ConnectInfo<Peer>`.
pub async fn serve(
    listener: ApiListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_with(listener, app, shutdown, HEADER_TIMEOUT).await
}

async fn serve_with(
    mut listener: ApiListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    header_timeout: Duration,
) -> io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(
            app.clone()
                .layer(axum::Extension(axum::extract::ConnectInfo(peer))),
        );
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_headers(MAX_HEADERS);
        let connection =
            graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "API connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use axum::routing::get;

    use super::*;

    #[test]
    fn a_request_head_that_trickles_or_never_comes_loses_its_connection() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let addr =
            rt.block_on(async {
                let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = tcp.local_addr().unwrap();
                let listener = ApiListener::new(tcp, None);
                let app = axum::Router::new().route(
                "/who",
                get(|axum::extract::ConnectInfo(p): axum::extract::ConnectInfo<Peer>| async move {
                    format!("{}", p.addr.ip())
                }),
            );
                tokio::spawn(serve_with(
                    listener,
                    app,
                    std::future::pending(),
                    Duration::from_millis(300),
                ));
                addr
            });
        // A whole request is answered, with the peer's address from the listener.
        let mut ok = std::net::TcpStream::connect(addr).unwrap();
        ok.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        ok.write_all(b"GET /who HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        ok.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("127.0.0.1"), "{answer}");
        // Half a head, then nothing: the server hangs up (EOF, not our 5 s read timeout).
        let mut slow = std::net::TcpStream::connect(addr).unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        slow.write_all(b"GET /who HTTP/1.1\r\nHost: x\r\n").unwrap();
        let mut rest = Vec::new();
        let closed = slow.read_to_end(&mut rest);
        assert!(closed.is_ok(), "the connection stayed open: {closed:?}");
        // An idle connection is closed the same way.
        let mut idle = std::net::TcpStream::connect(addr).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(idle.read_to_end(&mut rest).is_ok());
    }
}
