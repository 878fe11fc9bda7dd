'use strict';
// Test fixture: a faye extension that demands a bearer token.
//
// Options:
//   token      the accepted token, or
//   tokenFile  a file holding the accepted token, re-read on every message, so a test can
//              rotate it while the server runs (the old token then gets rejected)
//
// The token is taken from `ext.authToken` or from an `Authorization: Bearer <token>` request
// header. A rejected handshake gets "403::Handshake denied"; any other rejected message gets
// "401::Authentication invalid", the way Salesforce answers an expired OAuth token.
const fs = require('fs');

module.exports = (options) => {
  const accepted = () => options.tokenFile
    ? fs.readFileSync(options.tokenFile, 'utf8').trim()
    : options.token;
  const presented = (message, request) => {
    if (message.ext && typeof message.ext.authToken === 'string') return message.ext.authToken;
    const header = request && request.headers && request.headers.authorization;
    const match = header && /^Bearer\s+(.+)$/i.exec(header);
    return match ? match[1] : undefined;
  };
  return {
    incoming(message, request, callback) {
      if (presented(message, request) !== accepted()) {
        message.error = message.channel === '/meta/handshake'
          ? '403::Handshake denied'
          : '401::Authentication invalid';
      }
      callback(message);
    },
  };
};
