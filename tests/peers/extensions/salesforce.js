'use strict';
// Test fixture: faye behaving like Salesforce's Streaming API replay.
//
// Every event published on a non-meta, non-service channel gets a replay id (increasing,
// not contiguous: `step` apart) and Salesforce's shape, `data = {event: {replayId,
// createdDate}, payload: <published data>}`, and is kept in a per-channel log of at most
// `retention` events. A /meta/subscribe must carry `ext.replay = {channel: id}`:
//   -1  new events only;  -2  every retained event, replayed after the subscribe;
//   id  the events after id, replayed; "400::The replayId {id} you provided was invalid..."
//       when events after id have already left the log (outside the retention window).
// When `unknownClientFile` exists, the next /meta/connect destroys the session and gets
// "403::Unknown client" with handshake advice (the file is removed): events published
// until the client subscribes again reach it only through replay.
//
// With `logFile`, every event is also appended to that file (one JSON line each) and the
// logs are read back from it at start: the retention survives a restart, as Salesforce's
// does.
//
// Options: retention (default 1000), step (default 3), unknownClientFile, logFile.
const fs = require('fs');

module.exports = (options, bayeux) => {
  const retention = options.retention || 1000;
  const step = options.step || 3;
  const logs = new Map();       // channel -> {events: [{replayId, data}], start, ids: Set}
  const dropped = new Map();    // channel -> highest replay id that left the log
  const pending = new Map();    // clientId + ' ' + channel -> replay from
  const subscribers = new Set(); // clients that subscribed (not faye's own in-process client)
  let nextId = 1;
  // Appends to a channel's log, dropping what falls out of the retention; constant time
  // (a log of a million events is read from an index, not shifted).
  function append(channel, replayId, data) {
    let log = logs.get(channel);
    if (!log) {
      log = { events: [], start: 0, ids: new Set() };
      logs.set(channel, log);
    }
    log.events.push({ replayId, data });
    log.ids.add(replayId);
    while (log.events.length - log.start > retention) {
      const gone = log.events[log.start++];
      log.ids.delete(gone.replayId);
      dropped.set(channel, gone.replayId);
    }
    if (log.start > 1024 && log.start * 2 > log.events.length) {
      log.events = log.events.slice(log.start);
      log.start = 0;
    }
  }
  const retained = (channel) => {
    const log = logs.get(channel);
    return log ? log.events.slice(log.start) : [];
  };
  if (options.logFile && fs.existsSync(options.logFile)) {
    for (const line of fs.readFileSync(options.logFile, 'utf8').split('\n')) {
      if (!line) continue;
      const { channel, replayId, data } = JSON.parse(line);
      append(channel, replayId, data);
      nextId = Math.max(nextId, replayId + step);
    }
  }

  const replayable = (channel) => !channel.startsWith('/meta/') && !channel.startsWith('/service/');
  const isReplay = (message) => {
    const id = message.data && message.data.event && message.data.event.replayId;
    const log = logs.get(message.channel);
    return id !== undefined && log !== undefined && log.ids.has(id);
  };

  // Straight into faye's engine: in order, and not numbered again by `incoming`.
  const replay = (channel, from) => {
    const events = retained(channel).filter((event) => from === -2 || event.replayId > from);
    for (const event of events) bayeux._server._engine.publish({ channel, data: event.data });
  };

  return {
    incoming(message, callback) {
      const channel = message.channel;
      if (channel === '/meta/connect' && subscribers.has(message.clientId) && options.unknownClientFile
          && fs.existsSync(options.unknownClientFile)) {
        fs.unlinkSync(options.unknownClientFile);
        bayeux._server._engine.destroyClient(message.clientId);
        message.error = '403::Unknown client';
        return callback(message);
      }
      if (channel === '/meta/subscribe') {
        subscribers.add(message.clientId);
        const map = message.ext && message.ext.replay;
        const id = map && map[message.subscription];
        if (typeof id !== 'number') {
          message.error = `400::The replayId for channel ${message.subscription} wasn't found in the subscription request`;
        } else if (id >= 0 && id < (dropped.get(message.subscription) || 0)) {
          message.error = `400::The replayId {${id}} you provided was invalid.  Please provide a valid ID, -2 to replay all events, or -1 to replay only new events.`;
        } else if (id !== -1) {
          pending.set(message.clientId + ' ' + message.subscription, id);
        }
        return callback(message);
      }
      if (replayable(channel) && message.data !== undefined && !isReplay(message)) {
        const replayId = nextId;
        nextId += step;
        message.data = { event: { replayId, createdDate: new Date().toISOString() }, payload: message.data };
        append(channel, replayId, message.data);
        if (options.logFile) {
          fs.appendFileSync(options.logFile, JSON.stringify({ channel, replayId, data: message.data }) + '\n');
        }
      }
      callback(message);
    },
    outgoing(message, callback) {
      if (message.channel === '/meta/connect' && message.error === '403::Unknown client') {
        message.advice = { reconnect: 'handshake', interval: 0 };
      }
      if (message.channel === '/meta/subscribe' && message.successful) {
        const key = message.clientId + ' ' + message.subscription;
        if (pending.has(key)) {
          const from = pending.get(key);
          pending.delete(key);
          // Queued before anything published later, as Salesforce orders replay first.
          replay(message.subscription, from);
        }
      }
      callback(message);
    },
  };
};
