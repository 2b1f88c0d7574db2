//! The rustls side of [`super::PgTls`]: the certificate checks libpq's modes need beyond
//! rustls' own (which is `verify-full`), and tokio-postgres' `MakeTlsConnect` over
//! tokio-rustls, with handshake errors an operator can act on.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use super::{load_certs, load_key, Check, PgTls};

impl PgTls {
    /// A connector for tokio-postgres implementing these settings. Reads the certificate
    /// files every time, so a renewed CA or client certificate is picked up.
    pub fn connector(&self) -> Result<MakeRustls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup failed: {e}"))?;
        let check = self.check();
        let verifier: Arc<dyn ServerCertVerifier> = match check {
            Check::Nothing => Arc::new(Relaxed {
                chain: None,
                provider,
            }),
            Check::Chain | Check::ChainAndName => {
                let path = self
                    .root_cert
                    .as_ref()
                    .ok_or_else(|| self.needs_root_cert())?;
                let mut roots = RootCertStore::empty();
                for cert in load_certs(path, "sslrootcert")? {
                    roots.add(cert).map_err(|e| {
                        format!(
                            "sslrootcert {}: unusable CA certificate: {e}",
                            path.display()
                        )
                    })?;
                }
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                if check == Check::ChainAndName {
                    webpki
                } else {
                    Arc::new(Relaxed {
                        chain: Some(webpki),
                        provider,
                    })
                }
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(load_certs(cert, "sslcert")?, load_key(key)?)
                .map_err(|e| {
                    format!("sslcert {} / sslkey {}: {e}", cert.display(), key.display())
                })?,
            _ => builder.with_no_client_auth(),
        };
        Ok(MakeRustls {
            config: Arc::new(config),
            tls: self.clone(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Certificate checks beyond rustls' own (which is `verify-full`).
// ---------------------------------------------------------------------------------------------

/// libpq's checks below `verify-full`: `verify-ca` (`chain`: the chain must lead to a
/// trusted CA; the name is not checked — rustls checks the chain before the name, so a name
/// mismatch means the chain was good), and `require` / `prefer` without a CA (`chain` none:
/// any certificate is accepted). Either way the handshake signatures are checked, so the
/// session key belongs to that certificate.
#[derive(Debug)]
struct Relaxed {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// The tokio-postgres connector.
// ---------------------------------------------------------------------------------------------

/// tokio-postgres' `MakeTlsConnect` over rustls, for one connection string's settings.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
    tls: PgTls,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        // tokio-postgres asks even for Unix sockets (domain ""), where TLS is never used.
        let name = if domain.is_empty() {
            "localhost"
        } else {
            domain
        };
        let server_name = ServerName::try_from(name.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TLS: {name:?} is not a valid host name: {e}"),
            )
        })?;
        Ok(RustlsConnect {
            config: self.config.clone(),
            server_name,
            host: name.to_string(),
            tls: self.tls.clone(),
        })
    }
}

pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    host: String,
    tls: PgTls,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, io::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            tokio_rustls::TlsConnector::from(self.config)
                .connect(self.server_name, stream)
                .await
                .map(RustlsStream)
                .map_err(|e| describe_handshake_error(e, &self.host, &self.tls))
        })
    }
}

/// A handshake error as the operator needs it: which check failed, for which host, under
/// which sslmode.
fn describe_handshake_error(e: io::Error, host: &str, tls: &PgTls) -> io::Error {
    let mode = tls.mode;
    let ca = tls
        .root_cert
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let text = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            presented,
            ..
        })) => format!(
            "TLS: certificate for {} not valid for {host} (sslmode={mode}); connect with a name the certificate holds",
            if presented.is_empty() {
                "no name".to_string()
            } else {
                presented.iter().map(|n| plain_name(n)).collect::<Vec<_>>().join(", ")
            }
        ),
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)) => {
            format!("TLS: certificate not valid for {host} (sslmode={mode})")
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => format!(
            "TLS: the certificate of {host} is not signed by a CA in sslrootcert {ca} (sslmode={mode})"
        ),
        Some(rustls::Error::InvalidCertificate(other)) => {
            format!("TLS: the certificate of {host} is invalid: {other} (sslmode={mode})")
        }
        Some(other) => format!("TLS handshake with {host} failed: {other} (sslmode={mode})"),
        None => format!("TLS handshake with {host} failed: {e} (sslmode={mode})"),
    };
    io::Error::new(e.kind(), text)
}

/// webpki reports a certificate's names as `DnsName("db.svc")` / `IpAddress(10.0.0.1)`;
/// operators know them as `db.svc` / `10.0.0.1`.
fn plain_name(presented: &str) -> &str {
    for (open, close) in [("DnsName(\"", "\")"), ("IpAddress(", ")")] {
        if let Some(inner) = presented
            .strip_prefix(open)
            .and_then(|r| r.strip_suffix(close))
        {
            return inner;
        }
    }
    presented
}

/// A TLS session to PostgreSQL.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    /// No `tls-server-end-point` binding: SCRAM runs without channel binding
    /// (`channel_binding=require` in a URL therefore fails).
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_are_shown_plainly() {
        assert_eq!(plain_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(plain_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(plain_name("DirectoryName"), "DirectoryName");
    }
}
