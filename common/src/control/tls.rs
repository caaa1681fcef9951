//! TLS for the control plane: a self-signed certificate made at server start, a client that
//! accepts any certificate (peers authenticate with the job token instead), and the token proofs
//! bound to one TLS session through its exported keying material (EKM).
//!
//! Why this is enough: both sides send `HMAC(token, label || EKM)`. The EKM is a secret of this
//! one TLS session, so a man in the middle (who necessarily runs two sessions, with different
//! EKMs) can neither forward a proof usefully nor make one, and a recorded proof is worthless in
//! any other session. The different labels keep one side's proof from being reflected as the
//! other's.

use super::protocol::ALPN;
use super::token::Token;
use anyhow::{anyhow, Context, Result};
use ring::hmac;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use std::time::Duration;

/// The name the client asks for and the certificate carries (nobody checks it).
pub(crate) const SERVER_NAME: &str = "coca-control";

/// Label of the keying material exported from the TLS session for the proofs.
pub(crate) const EKM_LABEL: &[u8] = b"coca-control-auth";
/// Context of that export.
const EKM_CONTEXT: &[u8] = b"coca-control v1";
const CLIENT_PROOF_LABEL: &[u8] = b"coca client proof";
const SERVER_PROOF_LABEL: &[u8] = b"coca server proof";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's QUIC configuration: TLS 1.3 with a fresh self-signed certificate, our ALPN, and
/// an idle timeout of `idle_timeout` (the heartbeat timeout: a peer silent that long is gone).
pub(crate) fn server_config(idle_timeout: Duration) -> Result<quinn::ServerConfig> {
    let cert = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
        .context("cannot generate the control plane's certificate")?;
    let cert_der: CertificateDer<'static> = cert.cert.der().clone();
    let key_der: PrivateKeyDer<'static> =
        PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()).into();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key_der)
        .context("cannot use the generated certificate")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0; // no 0-RTT: nothing replayable
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| anyhow!("QUIC server TLS configuration: {e}"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle_timeout_value(idle_timeout)?))
        .max_concurrent_bidi_streams(1024u32.into())
        .max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The client's QUIC configuration: any server certificate (see [`AcceptAnyServerCert`]), our
/// ALPN, keep-alives every `keep_alive`, and a local idle timeout of `idle_timeout` (the server
/// announces its own, the heartbeat timeout; the smaller one applies).
pub(crate) fn client_config(
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(AcceptAnyServerCert {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| anyhow!("QUIC client TLS configuration: {e}"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle_timeout_value(idle_timeout)?))
        .keep_alive_interval(Some(keep_alive))
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

fn idle_timeout_value(d: Duration) -> Result<quinn::IdleTimeout> {
    quinn::IdleTimeout::try_from(d).map_err(|_| anyhow!("idle timeout {d:?} is too large"))
}

/// Accepts any server certificate, but still checks that the server holds the certificate's key
/// (handshake signatures, with the ring provider's algorithms). Who the server is, is settled by
/// the token proof afterwards, not by a certificate authority: a job has no PKI.
#[derive(Debug)]
struct AcceptAnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The keying material of this connection's TLS session, the same on both ends.
pub(crate) fn session_secret(conn: &quinn::Connection) -> Result<[u8; 32]> {
    let mut ekm = [0u8; 32];
    conn.export_keying_material(&mut ekm, EKM_LABEL, EKM_CONTEXT)
        .map_err(|_| anyhow!("cannot export keying material from the TLS session"))?;
    Ok(ekm)
}

fn proof(token: &Token, label: &[u8], ekm: &[u8; 32]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(label);
    ctx.update(ekm);
    ctx.sign().as_ref().to_vec()
}

fn verify(token: &Token, label: &[u8], ekm: &[u8; 32], proof: &[u8]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    let mut msg = Vec::with_capacity(label.len() + ekm.len());
    msg.extend_from_slice(label);
    msg.extend_from_slice(ekm);
    hmac::verify(&key, &msg, proof).is_ok() // constant time
}

/// The client's proof that it knows `token`, bound to the session `ekm`.
pub(crate) fn client_proof(token: &Token, ekm: &[u8; 32]) -> Vec<u8> {
    proof(token, CLIENT_PROOF_LABEL, ekm)
}

/// Checks a client's proof.
pub(crate) fn verify_client_proof(token: &Token, ekm: &[u8; 32], proof: &[u8]) -> bool {
    verify(token, CLIENT_PROOF_LABEL, ekm, proof)
}

/// The server's proof that it knows `token`, bound to the session `ekm`.
pub(crate) fn server_proof(token: &Token, ekm: &[u8; 32]) -> Vec<u8> {
    proof(token, SERVER_PROOF_LABEL, ekm)
}

/// Checks the server's proof.
pub(crate) fn verify_server_proof(token: &Token, ekm: &[u8; 32], proof: &[u8]) -> bool {
    verify(token, SERVER_PROOF_LABEL, ekm, proof)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_are_bound_to_token_session_and_direction() {
        let token = Token::from_secret("0123456789abcdef").unwrap();
        let other = Token::from_secret("0123456789abcdeX").unwrap();
        let ekm = [7u8; 32];
        let mut ekm2 = ekm;
        ekm2[0] ^= 1;
        let p = client_proof(&token, &ekm);
        assert!(verify_client_proof(&token, &ekm, &p));
        assert!(!verify_client_proof(&other, &ekm, &p));
        assert!(!verify_client_proof(&token, &ekm2, &p));
        assert!(!verify_server_proof(&token, &ekm, &p)); // no reflection
        assert!(!verify_client_proof(&token, &ekm, &p[..16]));
        assert!(verify_server_proof(
            &token,
            &ekm,
            &server_proof(&token, &ekm)
        ));
    }
}
