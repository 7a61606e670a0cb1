//! Upgraded connections (WebSocket and any other `Upgrade`): after the 101, bytes are copied both
//! ways until either side closes, or until the backend's drain cuts them.

use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::backend::UpgradeGuard;

/// Runs one upgraded connection to its end. `guard` counts it against the backend; `cut` turns
/// true when the backend's drain deadline passes.
pub async fn run(
    client: OnUpgrade,
    backend: OnUpgrade,
    guard: UpgradeGuard,
    mut cut: watch::Receiver<bool>,
) {
    let _guard = guard;
    let (client, backend) = match tokio::join!(client, backend) {
        (Ok(c), Ok(b)) => (c, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut client: TokioIo<Upgraded> = TokioIo::new(client);
    let mut backend: TokioIo<Upgraded> = TokioIo::new(backend);
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        _ = cut.wait_for(|cut| *cut) => {
            tracing::debug!("upgraded connection cut by drain");
        }
    }
}
