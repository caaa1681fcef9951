//! The watchdog's [`FailureSignal`] from the control plane's events: a failure elsewhere (an
//! Abort that names one, or a Restart) and a shutdown both release blocked collectives.

use super::watchdog::FailureSignal;
use coca_common::control::{ControlClient, Event};
use std::time::Duration;

/// Why a worker's collectives must stop, given a control-plane event; `None` for `Finished`.
pub fn stop_reason(event: &Event) -> Option<String> {
    match event {
        Event::Abort {
            failure: Some(f), ..
        } => Some(format!("the control plane aborted the job: {f}")),
        Event::Abort {
            reason,
            failure: None,
        } => Some(format!("the control plane stopped the job: {reason}")),
        Event::Restart {
            generation,
            failure,
        } => Some(format!(
            "the control plane restarts the job as generation {generation}: {failure}"
        )),
        Event::Finished => None,
    }
}

/// A signal reading `control`'s events. It takes the events it reads (the receiver is shared),
/// so the watchdog's verdict, not `RankContext::peer_failed`, then classifies the error.
pub fn from_control(control: &ControlClient) -> FailureSignal {
    let events = control.events().clone();
    Box::new(move |tick: Duration| events.recv_timeout(tick).ok().and_then(|e| stop_reason(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stop_is_a_reason_and_success_is_not() {
        assert_eq!(stop_reason(&Event::Finished), None);
        let shutdown = Event::Abort {
            reason: "interrupted (SIGINT)".into(),
            failure: None,
        };
        assert!(stop_reason(&shutdown).unwrap().contains("SIGINT"));
    }
}
