//! Waiting for a pod: one helper over kube-runtime's `await_condition` (a watch, so the wait
//! ends as soon as the API server says so, with no polling), bounded when a bound is given. A
//! leaf: it knows pods and time, nothing of the pipeline.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::wait::{Condition, await_condition, conditions};

/// Why a wait ended without its condition.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("not within {} s", .0.as_secs())]
    TimedOut(Duration),
}

/// Waits until pod `name` meets `condition` (which sees `None` once the pod is gone), for at
/// most `within` when given. Returns the pod as it was then (`None`: gone). A watch that
/// breaks (the API server restarting) is started again: only the bound ends the wait.
///
/// # Errors
/// [`WaitError::TimedOut`].
pub async fn pod<C>(
    pods: &Api<Pod>,
    name: &str,
    within: Option<Duration>,
    condition: C,
) -> Result<Option<Pod>, WaitError>
where
    C: Condition<Pod>,
{
    let met = async {
        loop {
            let met = |pod: Option<&Pod>| condition.matches_object(pod);
            match await_condition(pods.clone(), name, met).await {
                Ok(pod) => return pod,
                Err(error) => {
                    tracing::debug!(%error, pod = name, "the watch broke; watching again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    };
    match within {
        None => Ok(met.await),
        Some(within) => tokio::time::timeout(within, met)
            .await
            .map_err(|_| WaitError::TimedOut(within)),
    }
}

/// Waits until `pod` (this very pod, by uid: not a new one with its name) is gone.
///
/// # Errors
/// As [`pod`].
pub async fn gone(pods: &Api<Pod>, pod: &Pod, within: Duration) -> Result<(), WaitError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    self::pod(pods, &name, Some(within), conditions::is_deleted(&uid))
        .await
        .map(drop)
}
