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
    items: Mutex<Items>,
    limit: Option<usize>,
    /// Set while `open` continues a session from a ticket: the server may first send
    /// what it queued for the session, ahead of the reply `open` waits for, and the
    /// application cannot take any of it before `open` returns.
    lifted: std::sync::atomic::AtomicBool,
    pushed: Notify,
    popped: Notify,
}

/// The items, kept as the batches they arrived in: a long-polling response can bring tens
/// of thousands of events, and its vector is queued as it is rather than copied message by
/// message into one long deque.
#[derive(Default)]
struct Items {
    batches: VecDeque<Batch>,
    len: usize,
}

enum Batch {
    Messages(std::vec::IntoIter<Message>),
    Error(Error),
}

impl PendingQueue {
    pub(crate) fn new(limit: Option<usize>) -> Self {
        PendingQueue {
            items: Mutex::new(Items::default()),
            limit,
            lifted: std::sync::atomic::AtomicBool::new(false),
            pushed: Notify::new(),
            popped: Notify::new(),
        }
    }

    fn items(&self) -> std::sync::MutexGuard<'_, Items> {
        // A panic while holding this lock cannot leave the items half-updated.
        self.items.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends an item; never waits.
    pub(crate) fn push(&self, item: Pending) {
        let batch = match item {
            Ok(message) => Batch::Messages(vec![message].into_iter()),
            Err(error) => Batch::Error(error),
        };
        let mut items = self.items();
        items.batches.push_back(batch);
        items.len += 1;
        drop(items);
        self.pushed.notify_waiters();
    }

    /// Appends several messages in order; never waits.
    pub(crate) fn extend(&self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        let mut items = self.items();
        items.len += messages.len();
        items.batches.push_back(Batch::Messages(messages.into_iter()));
        drop(items);
        self.pushed.notify_waiters();
    }

    /// Takes the oldest item, if any.
    pub(crate) fn pop(&self) -> Option<Pending> {
        let mut items = self.items();
        let item = loop {
            match items.batches.front_mut()? {
                Batch::Messages(messages) => {
                    let message = messages.next();
                    if messages.len() == 0 {
                        items.batches.pop_front();
                    }
                    if let Some(message) = message {
                        break Ok(message);
                    }
                }
                Batch::Error(_) => {
                    if let Some(Batch::Error(error)) = items.batches.pop_front() {
                        break Err(error);
                    }
                }
            }
        };
        let was_full = self.limit.is_some_and(|limit| items.len >= limit);
        items.len -= 1;
        drop(items);
        // Only a queue that stops being full has anyone to wake (see `wait_for_space`).
        if was_full {
            self.popped.notify_waiters();
        }
        Some(item)
    }

    /// Waits until an item is pushed. Create the future before checking [`pop`](Self::pop)
    /// to not miss a push in between (see [`Notify::notified`]).
    pub(crate) fn pushed(&self) -> tokio::sync::futures::Notified<'_> {
        self.pushed.notified()
    }

    pub(crate) fn len(&self) -> usize {
        self.items().len
    }

    /// Whether the queue holds as many items as its limit allows.
    pub(crate) fn is_full(&self) -> bool {
        !self.lifted.load(std::sync::atomic::Ordering::Acquire)
            && self.limit.is_some_and(|limit| self.len() >= limit)
    }

    /// Lifts the limit (or puts it back): readers waiting for space go on at once.
    pub(crate) fn lift(&self, lifted: bool) {
        self.lifted.store(lifted, std::sync::atomic::Ordering::Release);
        if lifted {
            self.popped.notify_waiters();
        }
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
        queue.extend((0..3).map(|n| Message::new(format!("/n/{n}"))).collect());
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

    #[test]
    fn messages_and_errors_come_out_in_the_order_they_went_in() {
        let queue = PendingQueue::new(None);
        queue.extend(vec![Message::new("/a/1"), Message::new("/a/2")]);
        queue.push(Err(Error::malformed("in between")));
        queue.extend(Vec::new());
        queue.push(Ok(Message::new("/b/1")));
        queue.extend(vec![Message::new("/c/1")]);
        assert_eq!(queue.len(), 5);
        let popped: Vec<String> = std::iter::from_fn(|| queue.pop())
            .map(|item| match item {
                Ok(message) => message.channel,
                Err(error) => error.to_string(),
            })
            .collect();
        assert_eq!(popped, ["/a/1", "/a/2", "malformed reply from the server: in between", "/b/1", "/c/1"]);
        assert_eq!(queue.len(), 0);
    }
}
