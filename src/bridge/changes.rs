//! The changes the admin API makes at runtime: adding and removing subscriptions (with
//! what the API refuses that the configuration file may do) and resetting a replay
//! position.

use super::*;

impl Bridge {
    /// Adds a subscription at runtime: validates it, stores it, starts its forwarder and
    /// subscribes upstream. It is `active` once the server confirmed the channel, else
    /// `pending` (the source subscribes when it reconnects).
    ///
    /// # Errors
    /// [`BridgeError::Invalid`], [`BridgeError::UnknownSource`], [`BridgeError::Conflict`]
    /// (id taken), [`BridgeError::Upstream`] (refused by the server), [`BridgeError::Store`].
    pub async fn add_subscription(&self, raw: RawSubscription) -> Result<SubscriptionView, BridgeError> {
        self.check_posted(&raw)?;
        self.check_resolved(&raw).await?;
        let _one_change = self.reloading.lock().await;
        // Every source name counts as known here, so an unknown one gets its own 404.
        let mut names = self.source_names();
        names.insert(raw.source.clone());
        let config =
            config::validate_subscription(&raw, "", &names, &Env::new()).map_err(BridgeError::Invalid)?;
        if let Some(prefix) = &self.reserved_subjects
            && let Some(problem) = config::reserved_subject_problem(&config, prefix, "")
        {
            return Err(BridgeError::Invalid(vec![problem]));
        }
        let source =
            self.source(&config.source).ok_or_else(|| BridgeError::UnknownSource(config.source.clone()))?;
        match self.subscriptions.reserve(&config.id, self.max_subscriptions) {
            Ok(()) => {}
            Err(registry::Refused::Taken) => {
                return Err(BridgeError::Conflict(format!("a subscription with id {:?} exists", config.id)));
            }
            Err(registry::Refused::Full) => return Err(BridgeError::TooMany(self.max_subscriptions)),
        }
        let entry = match self.start_added(&raw, config, &source).await {
            Ok(entry) => entry,
            Err(error) => {
                self.subscriptions.release(&raw.id);
                return Err(error);
            }
        };
        let view = self.view(&entry);
        self.subscriptions
            .insert(entry)
            .map_err(|_| BridgeError::Conflict(format!("a subscription with id {:?} exists", view.id)))?;
        Ok(view)
    }

    /// What the API refuses that the (trusted) configuration file may do: secret
    /// references, which would let a caller read the bridge's environment or files, and
    /// webhooks to loopback, link-local or private addresses, unless allowed.
    pub(super) fn check_posted(&self, raw: &RawSubscription) -> Result<(), BridgeError> {
        let RawSink::Webhook { url, secret, .. } = &raw.sink else { return Ok(()) };
        if let Some(secret) = secret
            && (secret.starts_with("env:") || secret.starts_with("file:"))
        {
            return Err(BridgeError::Invalid(vec![config::Problem::new(
                "sink.secret",
                "secret references (env:, file:) are not accepted through the API; give the secret itself, or define the subscription in the configuration file",
            )]));
        }
        if !self.allow_private_webhooks
            && let Ok(parsed) = reqwest::Url::parse(url)
            && let Some(kind) = config::private_destination(&parsed)
        {
            return Err(BridgeError::Forbidden(format!(
                "sink.url: {:?} is a {kind} address; webhooks posted through the API may not target it (set admin.allow_private_webhooks = true to allow it)",
                crate::redact::mask_url(url)
            )));
        }
        Ok(())
    }

    /// A posted webhook whose host name resolves to a private address now is refused at
    /// once (its connections would be refused anyway, every one checked again when made).
    pub(super) async fn check_resolved(&self, raw: &RawSubscription) -> Result<(), BridgeError> {
        let RawSink::Webhook { url, .. } = &raw.sink else { return Ok(()) };
        let Some(name) = reqwest::Url::parse(url).ok().and_then(|url| url.domain().map(str::to_string))
        else {
            return Ok(());
        };
        match self.http.resolver.refusal(&name).await {
            Some(refused) => Err(BridgeError::Forbidden(format!("sink.url: {refused}"))),
            None => Ok(()),
        }
    }

    /// Stores, starts and subscribes upstream a reserved subscription.
    pub(super) async fn start_added(
        &self,
        raw: &RawSubscription,
        config: SubscriptionConfig,
        source: &SourceEntry,
    ) -> Result<SubscriptionEntry, BridgeError> {
        self.store.put_subscription(raw).await?;
        let entry = match self.start_subscription(config.clone(), Origin::Api, None).await {
            Ok(entry) => entry,
            Err(error) => {
                self.store.delete_subscription(&config.id).await?;
                return Err(error);
            }
        };
        let pattern = config.channel.as_str();
        if source.client.status().state == SessionState::Connected
            && !source.client.subscriptions().contains(pattern)
            && let Err(error) = source.client.subscribe(pattern).await
            && matches!(error, Error::Server(_))
        {
            source.routes().remove(&config.id);
            let entry = Self::stop_forwarder(entry).await;
            entry.spool.release_all();
            self.store.spool_delete(&config.id).await?;
            self.store.delete_subscription(&config.id).await?;
            return Err(BridgeError::Upstream(error));
        }
        tracing::info!(id = %config.id, source = %config.source, channel = %pattern, "subscription added");
        Ok(entry)
    }

    /// Removes a subscription added through the API: its route goes first, its forwarder
    /// finishes the delivery in flight, then the channel is unsubscribed upstream unless
    /// another subscription of the source still uses it, and the record and its spool are
    /// deleted (what was still spooled is discarded, and counted in the log).
    ///
    /// # Errors
    /// [`BridgeError::NotFound`], [`BridgeError::Conflict`] for a configured subscription,
    /// [`BridgeError::Store`].
    pub async fn remove_subscription(&self, id: &str) -> Result<(), BridgeError> {
        let _one_change = self.reloading.lock().await;
        let entry = self
            .subscriptions
            .remove(id, |entry| match entry.origin {
                Origin::Config => Err(BridgeError::Conflict(format!(
                    "subscription {id:?} is defined in the configuration file; remove it there and restart the bridge"
                ))),
                Origin::Api => Ok(()),
            })
            .ok_or_else(|| BridgeError::NotFound(format!("subscription {id:?}")))??;
        // Its source may be gone (a reload removed it): what is left of it is removed.
        let source = self.source(&entry.config.source);
        if let Some(source) = &source {
            source.routes().remove(id);
        }
        let entry = Self::stop_forwarder(entry).await;
        let pattern = entry.config.channel.as_str();
        if let Some(source) = &source {
            let still_needed =
                source.routes().snapshot().iter().any(|route| route.pattern.as_str() == pattern);
            if !still_needed
                && source.client.subscriptions().contains(pattern)
                && let Err(error) = source.client.unsubscribe(pattern).await
            {
                tracing::warn!(id, channel = %pattern, error = %error, "could not unsubscribe upstream");
            }
            if let Some(replay) = &source.replay {
                replay.remove(id);
            }
        }
        if source.as_ref().is_none_or(|source| source.replay.is_some()) {
            self.store.delete_positions(id).await?;
        }
        let backlog = entry.spool.backlog();
        entry.spool.release_all();
        self.store.spool_delete(id).await?;
        self.store.delete_subscription(id).await?;
        self.metrics.forget_subscription(id);
        if backlog.messages > 0 {
            tracing::warn!(
                id,
                discarded = backlog.messages,
                "subscription removed with messages still spooled; they are discarded"
            );
        } else {
            tracing::info!(id, "subscription removed");
        }
        Ok(())
    }

    /// Sets a subscription's replay position (an operator's reset), stores it, and makes
    /// the live session subscribe again from it.
    ///
    /// # Errors
    /// [`BridgeError::NotFound`], [`BridgeError::Conflict`] when its source does not use
    /// replay, [`BridgeError::Store`].
    pub async fn reset_position(
        &self,
        id: &str,
        position: ReplayPosition,
    ) -> Result<SubscriptionView, BridgeError> {
        let _one_change = self.reloading.lock().await;
        let (source, channel) = self
            .subscriptions
            .get(id, |entry| (entry.config.source.clone(), entry.config.channel.to_string()))
            .ok_or_else(|| BridgeError::NotFound(format!("subscription {id:?}")))?;
        let source = self.source(&source).ok_or_else(|| {
            BridgeError::Conflict(format!("the source {source:?} of subscription {id:?} is gone"))
        })?;
        let replay = source.replay.as_ref().ok_or_else(|| {
            BridgeError::Conflict(format!(
                "source {:?} does not use replay (set replay = true)",
                source.config.name
            ))
        })?;
        let positions = replay.reset(id, position).expect("the subscription is tracked");
        self.store.put_positions(id, &positions).await?;
        let channel = channel.as_str();
        let lock = || source.subscribing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if source.client.subscriptions().contains(channel) && lock().insert(channel.to_string()) {
            let resubscribed = async {
                source.client.unsubscribe(channel).await?;
                source.client.subscribe(channel).await
            };
            let resubscribed = resubscribed.await;
            lock().remove(channel);
            if let Err(error) = resubscribed {
                tracing::warn!(id, channel, error = %error, "could not subscribe again from the new position; it applies on the next subscribe");
            }
        }
        tracing::info!(id, position = %position, "replay position reset");
        self.subscriptions
            .get(id, |entry| self.view(entry))
            .ok_or_else(|| BridgeError::NotFound(format!("subscription {id:?}")))
    }
}
