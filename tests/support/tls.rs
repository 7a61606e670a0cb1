//! TLS for the tests: a throw-away CA made with rcgen, certificates it issues written as PEM files
//! into a temporary directory, rustls clients that trust only that CA, and TLS backends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A test CA and the directory its certificates are written to.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    pub dir: tempfile::TempDir,
}

/// A certificate issued by the test CA, written as `{stem}.crt` and `{stem}.key`.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl Pki {
    /// A fresh CA, its certificate written as `ca.crt`.
    pub fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "switchyard test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
        Pki { ca, dir }
    }

    /// The CA certificate's file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses) and writes it (leaf,
    /// then the CA) and its key as `{stem}.crt` and `{stem}.key`, replacing earlier ones.
    pub fn issue(&self, stem: &str, names: &[&str]) -> Issued {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{stem} (switchyard test)"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let issued = Issued {
            cert: self.dir.path().join(format!("{stem}.crt")),
            key: self.dir.path().join(format!("{stem}.key")),
            der: cert.der().clone(),
        };
        std::fs::write(&issued.cert, format!("{}{}", cert.pem(), self.ca.pem())).unwrap();
        std::fs::write(&issued.key, key.serialize_pem()).unwrap();
        issued
    }

    /// A client that trusts only this CA, offering `alpn`, speaking only `versions`.
    pub fn client(
        &self,
        alpn: &[&[u8]],
        versions: &[&'static SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A client offering `h2` and `http/1.1`, TLS 1.2 and 1.3.
    pub fn default_client(&self) -> Arc<ClientConfig> {
        self.client(&[b"h2", b"http/1.1"], rustls::DEFAULT_VERSIONS)
    }

    /// A server config serving `issued`, offering `alpn`.
    pub fn server(&self, issued: &Issued, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let chain = vec![issued.der.clone(), self.ca.der().clone()];
        let key_pem = std::fs::read(&issued.key).unwrap();
        let key = PrivateKeyDer::from_pem_slice(&key_pem).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// Connects to `addr` over TLS, sending `server_name` as SNI (none for an IP address).
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    TlsConnector::from(config).connect(name, stream).await
}

/// The certificate the server presented first (its leaf).
pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate")[0]
        .clone()
}

/// The ALPN protocol the server chose.
pub fn alpn(stream: &TlsStream<TcpStream>) -> Option<String> {
    stream
        .get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

/// One HTTP/1.1 or HTTP/2 connection over `stream`, as its ALPN says.
pub enum Client {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Client {
    /// Shakes hands in the protocol the server chose.
    pub async fn over(stream: TlsStream<TcpStream>) -> Client {
        if alpn(&stream).as_deref() == Some("h2") {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            Client::Http2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            Client::Http1(sender)
        }
    }

    /// Sends `GET https://{host}{path}` and reads the response whole.
    pub async fn get(&mut self, host: &str, path: &str) -> (Response<()>, String) {
        use http_body_util::BodyExt;
        let response = match self {
            Client::Http1(sender) => {
                let request = Request::get(path)
                    .header("host", host)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                sender.send_request(request).await.unwrap()
            }
            Client::Http2(sender) => {
                let request = Request::get(format!("https://{host}{path}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                sender.send_request(request).await.unwrap()
            }
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            Response::from_parts(parts, ()),
            String::from_utf8_lossy(&body).into_owned(),
        )
    }
}

/// What a [`recording_backend`] saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub version: Version,
    pub uri: http::Uri,
    pub headers: http::HeaderMap,
    /// The SNI of the TLS connection it came on (None for cleartext or no SNI).
    pub sni: Option<String>,
    /// Which accepted connection (0, 1, ...) it came on.
    pub connection: usize,
}

/// A backend that answers every request `200 seen` and records it; with `tls`, over TLS (the
/// ALPN it offers is the config's). Binds `bind` (port 0 for a fresh one).
pub async fn recording_backend(
    bind: SocketAddr,
    tls: Option<Arc<ServerConfig>>,
) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut connection = 0;
        while let Ok((stream, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            let acceptor = tls.clone().map(TlsAcceptor::from);
            let this = connection;
            connection += 1;
            tokio::spawn(async move {
                let serve = |sni: Option<String>| {
                    service_fn(move |request: Request<Incoming>| {
                        record.lock().unwrap().push(Seen {
                            version: request.version(),
                            uri: request.uri().clone(),
                            headers: request.headers().clone(),
                            sni: sni.clone(),
                            connection: this,
                        });
                        async move {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"seen"),
                            )))
                        }
                    })
                };
                let builder = auto::Builder::new(TokioExecutor::new());
                match acceptor {
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), serve(None))
                            .await;
                    }
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let sni = stream.get_ref().1.server_name().map(str::to_owned);
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), serve(sni))
                            .await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Where `localhost` resolves first: what the proxy will connect to for `https://localhost:PORT`.
pub async fn localhost() -> std::net::IpAddr {
    tokio::net::lookup_host("localhost:0")
        .await
        .unwrap()
        .next()
        .expect("localhost resolves")
        .ip()
}

/// Writes `text` as `proxy.toml` in `dir`.
pub fn write_proxy_toml(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    path
}
