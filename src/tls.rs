//! Certificates and rustls configurations, built when a config is validated: PEM files read into
//! certificate chains and keys, the server config of a TLS listener (certificate chosen by SNI,
//! ALPN `h2` then `http/1.1`, TLS 1.2 and 1.3 only), and the client configs for `https://`
//! backends (Mozilla's roots or the pool's `ca`).
//!
//! Everything here runs at load time; the request path only clones the `Arc`s built here.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// TLS 1.3 and 1.2; nothing older (rustls implements nothing older either).
pub static PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// ALPN ids, in order of preference.
const H2: &[u8] = b"h2";
const HTTP11: &[u8] = b"http/1.1";

/// The crypto provider of every config built here: ring, named explicitly so that another crate
/// enabling a second provider cannot make the process-wide default ambiguous.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// Why a certificate, key or CA file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not valid PEM.
    #[error("{} is not valid PEM: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        #[source]
        source: pem::Error,
    },
    /// The file holds no `CERTIFICATE` section.
    #[error("no certificate found in {}", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no private key section (PKCS#8, PKCS#1 or SEC1).
    #[error("no private key found in {}", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The key, or its pairing with the certificate, is not usable by rustls.
    #[error("the key in {} cannot be used with the certificate in {}: {source}", key.display(), cert.display())]
    Unusable {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason (unsupported algorithm, key does not match the certificate...).
        #[source]
        source: rustls::Error,
    },
    /// A CA file holds a certificate that cannot be a trust anchor.
    #[error("{} holds a certificate that cannot be a trust anchor: {source}", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
}

impl PemError {
    /// The file the problem is in: for a key that does not go with its certificate, the key's.
    pub fn file(&self) -> &Path {
        match self {
            PemError::Read { path, .. }
            | PemError::Pem { path, .. }
            | PemError::NoCertificate { path }
            | PemError::NoKey { path }
            | PemError::BadCa { path, .. } => path,
            PemError::Unusable { key, .. } => key,
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in the PEM file at `path` (at least one), and the file's bytes.
fn certificates(path: &Path) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), PemError> {
    let bytes = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PemError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(PemError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok((chain, bytes))
}

/// A certificate chain and its private key, loaded and checked to belong together.
#[derive(Clone)]
pub struct LoadedKey {
    /// What rustls serves.
    pub certified: Arc<CertifiedKey>,
    /// SHA-256 of both files' contents: tells a rotated certificate from an unchanged one.
    pub fingerprint: [u8; 32],
}

impl fmt::Debug for LoadedKey {
    // The key stays out of logs; the chain's length and the fingerprint identify it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedKey")
            .field("chain_len", &self.certified.cert.len())
            .field("fingerprint", &hex(&self.fingerprint[..8]))
            .finish()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the chain at `cert` and the key at `key` (the first private key in that file), and
/// checks that the key is usable and matches the chain's first certificate.
pub fn load_key_pair(cert: &Path, key: &Path) -> Result<LoadedKey, PemError> {
    let (chain, cert_bytes) = certificates(cert)?;
    let key_bytes = read(key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|error| match error {
        pem::Error::NoItemsFound => PemError::NoKey {
            path: key.to_path_buf(),
        },
        source => PemError::Pem {
            path: key.to_path_buf(),
            source,
        },
    })?;
    let unusable = |source| PemError::Unusable {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    };
    let certified = CertifiedKey::from_der(chain, private, &provider()).map_err(unusable)?;
    // `from_der` lets a pairing it cannot check pass; a key it can check must match.
    if let Err(error @ rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        certified.keys_match()
    {
        return Err(unusable(error));
    }
    let mut digest = Sha256::new();
    digest.update((cert_bytes.len() as u64).to_be_bytes());
    digest.update(&cert_bytes);
    digest.update(&key_bytes);
    Ok(LoadedKey {
        certified: Arc::new(certified),
        fingerprint: digest.finalize().into(),
    })
}

/// The CA certificates of a pool's `ca` file, and the file's SHA-256.
pub fn load_ca(path: &Path) -> Result<(Vec<CertificateDer<'static>>, [u8; 32]), PemError> {
    let (certificates, bytes) = certificates(path)?;
    // Checked now so that a bad CA is a config error, not a failure of every request.
    let mut roots = RootCertStore::empty();
    for certificate in &certificates {
        roots
            .add(certificate.clone())
            .map_err(|source| PemError::BadCa {
                path: path.to_path_buf(),
                source,
            })?;
    }
    Ok((certificates, Sha256::digest(&bytes).into()))
}

/// One certificate of a listener and the names it serves (lower case; `*.example.com` serves
/// one label under `example.com`). No names: only the default.
#[derive(Debug)]
pub struct SniCertificate<'a> {
    /// The chain and key.
    pub key: &'a LoadedKey,
    /// The server names it is chosen for.
    pub server_names: &'a [String],
}

/// The server config of a TLS listener: the first certificate is served when the client's SNI
/// names none of the others (or it sends none).
pub fn server_config(
    certificates: &[SniCertificate<'_>],
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let default = certificates
        .first()
        .map(|c| Arc::clone(&c.key.certified))
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let mut resolver = SniResolver {
        default,
        exact: HashMap::new(),
        wildcard: HashMap::new(),
    };
    for certificate in certificates {
        for name in certificate.server_names {
            let key = Arc::clone(&certificate.key.certified);
            match name.strip_prefix("*.") {
                Some(parent) => resolver.wildcard.entry(parent.to_owned()).or_insert(key),
                None => resolver.exact.entry(name.clone()).or_insert(key),
            };
        }
    }
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![H2.to_vec(), HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// Chooses a listener's certificate by the client's SNI.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the parent of the wildcard: `example.com` for `*.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls hands SNI over in lower case.
        let chosen = client_hello.server_name().and_then(|name| {
            self.exact.get(name).or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent)
            })
        });
        Some(Arc::clone(chosen.unwrap_or(&self.default)))
    }
}

/// The client configs of one `https://` backend: one offering `h2` and `http/1.1` (requests),
/// one offering only `http/1.1` (upgrades, which HTTP/2 cannot carry, and health checks).
pub fn client_configs(
    ca: Option<&[CertificateDer<'static>]>,
) -> Result<(Arc<ClientConfig>, Arc<ClientConfig>), rustls::Error> {
    let roots = match ca {
        Some(certificates) => {
            let mut roots = RootCertStore::empty();
            for certificate in certificates {
                roots.add(certificate.clone())?;
            }
            roots
        }
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let build = |alpn: Vec<Vec<u8>>| -> Result<Arc<ClientConfig>, rustls::Error> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn;
        Ok(Arc::new(config))
    };
    Ok((
        build(vec![H2.to_vec(), HTTP11.to_vec()])?,
        build(vec![HTTP11.to_vec()])?,
    ))
}

/// Whether `name` can be a `server_names` entry: a DNS name, or `*.` and a DNS name.
pub fn is_server_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.contains('*')
        && name.contains(|c: char| c.is_ascii_alphabetic())
        && rustls_pki_types::DnsName::try_from(name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_dns_names_or_one_leading_wildcard() {
        for good in ["example.com", "a.example.com", "*.example.com", "localhost"] {
            assert!(is_server_name(good), "{good}");
        }
        for bad in [
            "",
            "*",
            "*.",
            "a.*.example.com",
            "ex ample.com",
            "10.0.0.1",
            "**.a.com",
        ] {
            assert!(!is_server_name(bad), "{bad}");
        }
    }
}
