//! Every retry of a step that meets a passing fault (the API server restarting, a reply lost,
//! an exec stream dropped) goes through one crate, backon, with one of the named policies
//! here; no step keeps a retry loop of its own. A leaf: it knows time and errors, nothing of
//! the pipeline.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ConstantBuilder, ExponentialBuilder, Retryable as _};

/// How many times a step past the commit is tried (a thaw, an annotation, a delete).
pub const FINISH_TRIES: usize = 3;

/// A step past the commit: [`FINISH_TRIES`] tries, half a second apart. A fault
/// that outlasts it is reported with the command that finishes; nothing is undone.
pub fn finishing() -> ConstantBuilder {
    ConstantBuilder::default()
        .with_delay(Duration::from_millis(500))
        .with_max_times(FINISH_TRIES - 1)
}

/// A read, write or delete right after a fault that may be the API server itself restarting
/// (or a lost reply it must answer again): from half a second, doubling to 4 s, ten tries in
/// about 25 s.
pub fn api_restart() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(4))
        .with_max_times(9)
}

/// A launcher that could not be reached while its lease runs: every second, for `within`
/// (the part of the lease that may pass before the app resumes by itself).
pub fn lease_renewal(within: Duration) -> ConstantBuilder {
    ConstantBuilder::default()
        .with_delay(Duration::from_secs(1))
        .with_max_times(
            usize::try_from(within.as_secs())
                .unwrap_or(usize::MAX)
                .max(1),
        )
}

/// Runs `step` by `policy`, trying again after every error; the last error if no try worked.
pub async fn by<P, F, Fut, T, E>(policy: P, step: F) -> Result<T, E>
where
    P: BackoffBuilder,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    step.retry(policy).await
}

/// [`by`], trying again only after an error `passing` says may pass (any other is an answer,
/// returned at once).
pub async fn by_when<P, F, Fut, T, E>(
    policy: P,
    step: F,
    passing: impl FnMut(&E) -> bool,
) -> Result<T, E>
where
    P: BackoffBuilder,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    step.retry(policy).when(passing).await
}

/// Whether an API error may pass: anything but the API server's own answer (a 4xx status it
/// returned: not found, forbidden, conflict, invalid; "too many requests" passes, and so does
/// a 5xx of a server starting or overloaded).
pub fn passing(error: &kube::Error) -> bool {
    !matches!(error, kube::Error::Api(status) if (400..500).contains(&status.code) && status.code != 429)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_passing_fault_is_tried_again_and_an_answer_is_not() {
        let tries = AtomicUsize::new(0);
        let done: Result<usize, &str> = by(finishing(), || async {
            match tries.fetch_add(1, Ordering::SeqCst) {
                0..=1 => Err("passing"),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(done, Ok(2));

        let tries = AtomicUsize::new(0);
        let answer: Result<(), &str> = by_when(
            api_restart(),
            || async {
                tries.fetch_add(1, Ordering::SeqCst);
                Err("not found")
            },
            |e| *e != "not found",
        )
        .await;
        assert_eq!(answer, Err("not found"));
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn each_policy_gives_up_after_its_tries() {
        for (policy, tries) in [
            (finishing(), FINISH_TRIES),
            (lease_renewal(Duration::from_secs(30)), 31),
        ] {
            let count = AtomicUsize::new(0);
            let last: Result<(), usize> = by(policy, || async {
                Err(count.fetch_add(1, Ordering::SeqCst))
            })
            .await;
            assert_eq!(count.load(Ordering::SeqCst), tries);
            assert_eq!(last, Err(tries - 1));
        }
        let count = AtomicUsize::new(0);
        let _: Result<(), ()> = by(api_restart(), || async {
            count.fetch_add(1, Ordering::SeqCst);
            Err(())
        })
        .await;
        assert_eq!(count.load(Ordering::SeqCst), 10);
    }
}
