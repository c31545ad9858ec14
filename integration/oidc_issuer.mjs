// An independent OIDC issuer for the integration tier: oauth2-mock-server (npm) on
// loopback with an RS256 key, minting GitHub-Actions-shaped id-tokens. A token comes from
// its own token endpoint:
//   curl -s -X POST $ISSUER/token -d grant_type=client_credentials -d aud=mayfly \
//        --data-urlencode 'claims={"repository":"acme/app",...}'
// The `claims` form field (JSON) is merged into the payload before signing, so a test can
// shape each token (another repository, another audience, an expired token, ...).
// Prints the issuer URL on stdout once listening; stops on SIGTERM.
import { OAuth2Server } from 'oauth2-mock-server';

const port = Number(process.argv[2] ?? 0);
const server = new OAuth2Server();
await server.issuer.keys.generate('RS256');
server.service.on('beforeTokenSigning', (token, req) => {
  const now = Math.floor(Date.now() / 1000);
  Object.assign(token.payload, {
    sub: 'repo:acme/app:ref:refs/heads/main',
    jti: crypto.randomUUID(),
    iat: now,
    nbf: now,
    exp: now + 300,
    repository: 'acme/app',
    repository_owner: 'acme',
    ref: 'refs/heads/main',
    ref_type: 'branch',
    event_name: 'push',
    sha: 'c0ffee0000000000000000000000000000000001',
    job_workflow_ref: 'acme/app/.github/workflows/deploy.yml@refs/heads/main',
    run_id: '1001',
  });
  delete token.payload.scope;
  if (req.body && typeof req.body.claims === 'string') {
    Object.assign(token.payload, JSON.parse(req.body.claims));
  }
});
await server.start(port, '127.0.0.1');
console.log(server.issuer.url);
process.on('SIGTERM', async () => {
  await server.stop();
  process.exit(0);
});
