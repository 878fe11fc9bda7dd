'use strict';
// Test fixture: once `triggerFile` exists, every /meta/connect reply tells the client to go
// away for good: successful false, "403::Session closed by the server", advice reconnect none.
const fs = require('fs');

module.exports = (options) => ({
  outgoing(message, callback) {
    if (message.channel === '/meta/connect' && fs.existsSync(options.triggerFile)) {
      message.successful = false;
      message.error = '403::Session closed by the server';
      message.advice = { reconnect: 'none' };
    }
    callback(message);
  },
});
