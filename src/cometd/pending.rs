//! The queue of received messages waiting for [`Client::receive`](super::Client::receive).
//!
//! It is the hand-off between the session (which pushes, and never waits) and the
//! application (which pops). Its limit does not bound pushes, so protocol replies are never
//! held up by a slow consumer; instead the session asks [`wait_for_space`](PendingQueue::wait_for_space)
//! before it requests more events from the server. Memory stays bounded by the limit plus
//! one server batch.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::error::Error;
use super::message::Message;

/// What `receive` hands out: a message, or an error the session wants the application to
/// see in order (a failed resubscription, the server closing the session).
pub(crate) type Pending = Result<Message, Error>;

pub(crate) struct PendingQueue {
    items: Mutex<VecDeque<Pending>>,
    limit: Option<usize>,
    pushed: Notify,
    popped: Notify,
}

impl PendingQueue {
    pub(crate) fn new(limit: Option<usize>) -> Self {
        PendingQueue {
            items: Mutex::new(VecDeque::new()),
            limit,
            pushed: Notify::new(),
            popped: Notify::new(),
        }
    }

    fn items(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        // A panic while holding this lock cannot leave the deque half-updated.
        self.items.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends an item; never waits.
    pub(crate) fn push(&self, item: Pending) {
        self.items().push_back(item);
        self.pushed.notify_waiters();
    }

    /// Appends several items in order; never waits.
    pub(crate) fn extend(&self, items: impl IntoIterator<Item = Message>) {
        let mut queue = self.items();
        let before = queue.len();
        queue.extend(items.into_iter().map(Ok));
        let added = queue.len() > before;
        drop(queue);
        if added {
            self.pushed.notify_waiters();
        }
    }

    /// Takes the oldest item, if any.
    pub(crate) fn pop(&self) -> Option<Pending> {
        let item = self.items().pop_front();
        if item.is_some() {
            self.popped.notify_waiters();
        }
        item
    }

    /// Waits until an item is pushed. Create the future before checking [`pop`](Self::pop)
    /// to not miss a push in between (see [`Notify::notified`]).
    pub(crate) fn pushed(&self) -> tokio::sync::futures::Notified<'_> {
        self.pushed.notified()
    }

    pub(crate) fn len(&self) -> usize {
        self.items().len()
    }

    /// Whether the queue holds as many items as its limit allows.
    pub(crate) fn is_full(&self) -> bool {
        self.limit.is_some_and(|limit| self.len() >= limit)
    }

    /// Waits until the queue is below its limit.
    pub(crate) async fn wait_for_space(&self) {
        loop {
            let popped = self.popped.notified();
            if !self.is_full() {
                return;
            }
            popped.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn pushes_never_wait_and_space_opens_when_popped() {
        let queue = Arc::new(PendingQueue::new(Some(2)));
        queue.extend((0..3).map(|n| Message::new(format!("/n/{n}"))));
        assert_eq!(queue.len(), 3, "a batch larger than the limit is kept whole");
        assert!(queue.is_full());

        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.wait_for_space().await }
        });
        assert_eq!(queue.pop().unwrap().unwrap().channel, "/n/0");
        assert_eq!(queue.pop().unwrap().unwrap().channel, "/n/1");
        waiter.await.expect("space opened");
        assert_eq!(queue.pop().unwrap().unwrap().channel, "/n/2");
        assert!(queue.pop().is_none());
    }
}
