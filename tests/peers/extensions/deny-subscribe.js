'use strict';
// Test fixture: once `triggerFile` exists, subscriptions to `channel` are refused with
// "403:<channel>:Subscription denied".
const fs = require('fs');

module.exports = (options) => ({
  incoming(message, callback) {
    if (message.channel === '/meta/subscribe' && message.subscription === options.channel
        && fs.existsSync(options.triggerFile)) {
      message.error = `403:${options.channel}:Subscription denied`;
    }
    callback(message);
  },
});
