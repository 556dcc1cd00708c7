//! The TCP listener of the agent's and the orchestrator's HTTP APIs: TLS (rustls) with an
//! optional client certificate of the cluster CA, or plain HTTP for `--insecure` on loopback.
//!
//! [`ApiListener`] is an axum [`Listener`]: TCP connections are accepted by a task of its own,
//! each handshake runs in a task with a deadline (a client that stalls in its handshake holds
//! up nobody), at most [`MAX_CONNECTIONS`] connections are open at once, and the server sees
//! each connection's [`Peer`] (address and certificate identity) through axum's
//! `ConnectInfo`, which the access layer ([`crate::auth`]) reads.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use godwit_tls::rustls::ServerConfig;
use godwit_tls::Identity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Connections an API serves at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 512;
/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of an API connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The identity its client certificate names (verified against the cluster CA), if it
    /// presented one; always `None` on a plain connection.
    pub identity: Option<Identity>,
}

impl Connected<IncomingStream<'_, ApiListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, ApiListener>) -> Self {
        stream.remote_addr().clone()
    }
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
    local: SocketAddr,
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
    pub fn new(listener: TcpListener, tls: Option<Arc<ServerConfig>>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let is_tls = tls.is_some();
        let acceptor = tokio::spawn(accept_loop(
            listener,
            tls.map(tokio_rustls::TlsAcceptor::from),
            tx,
        ));
        Ok(ApiListener {
            local,
            tls: is_tls,
            ready,
            acceptor,
        })
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

impl Listener for ApiListener {
    type Io = ApiStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (ApiStream, Peer) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept task ended (its socket failed for good): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Peer> {
        Ok(Peer {
            addr: self.local,
            identity: None,
        })
    }
}
