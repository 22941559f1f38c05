// Sign-in with the authorization-code flow and PKCE (RFC 6749 §4.1, RFC 7636, S256) at the
// organisation's OpenID provider, through fieldsync's `/v1/auth/config` and `/v1/auth/token`
// relay; silent renewal with the refresh token before the access token expires (the socket's
// client asks for the renewed token: `current`, `outliving`); sign-out.
// The access token lives in memory only; the refresh token in this tab's sessionStorage, so a
// reload does not sign the user out (and closing the tab does).

export interface AuthConfig {
  issuer: string;
  authorization_endpoint?: string;
  end_session_endpoint?: string;
  token_endpoint: string;
  client_id: string;
  scopes: string[];
}

interface TokenAnswer {
  access_token: string;
  refresh_token?: string;
  expires_in?: number;
}

const REFRESH = "fieldsync.refresh";
const PENDING = "fieldsync.pending"; // the verifier and state of a sign-in under way

export class SignInRequired extends Error {}

function base64url(bytes: Uint8Array): string {
  let text = "";
  for (const byte of bytes) text += String.fromCharCode(byte);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function random(size: number): string {
  return base64url(crypto.getRandomValues(new Uint8Array(size)));
}

async function s256(verifier: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  return base64url(new Uint8Array(digest));
}

export class Auth {
  accessToken: string | null = null;
  expiresAt = 0; // epoch milliseconds
  private timer: number | undefined;
  private renewAt = 0; // epoch milliseconds of the renewal scheduled
  private renewing: Promise<string> | null = null;
  private waiting: Array<(token: string) => void> = []; // for the next renewal's token

  constructor(readonly config: AuthConfig) {}

  static async load(): Promise<Auth> {
    const answer = await fetch("/v1/auth/config", { headers: { Accept: "application/json" } });
    if (!answer.ok) throw new Error(`sign-in configuration: HTTP ${answer.status}`);
    return new Auth((await answer.json()) as AuthConfig);
  }

  get redirectUri(): string {
    return `${location.origin}/dashboard/`;
  }

  /** Go to the provider's login page. */
  async signIn(): Promise<never> {
    const endpoint = this.config.authorization_endpoint;
    if (!endpoint) throw new Error("the OpenID provider offers no authorization endpoint");
    const verifier = random(48);
    const state = random(16);
    sessionStorage.setItem(PENDING, JSON.stringify({ verifier, state }));
    const url = new URL(endpoint);
    url.search = new URLSearchParams({
      response_type: "code",
      client_id: this.config.client_id,
      redirect_uri: this.redirectUri,
      scope: this.config.scopes.join(" "),
      state,
      code_challenge: await s256(verifier),
      code_challenge_method: "S256",
    }).toString();
    location.assign(url.toString());
    return new Promise<never>(() => {});
  }

  /** Finish a sign-in the provider sent the browser back from, or renew a stored one.
   * Throws `SignInRequired` when there is neither. */
  async start(): Promise<void> {
    const query = new URLSearchParams(location.search);
    const code = query.get("code");
    if (code !== null) {
      const pending = JSON.parse(sessionStorage.getItem(PENDING) ?? "null") as {
        verifier: string;
        state: string;
      } | null;
      sessionStorage.removeItem(PENDING);
      // The code leaves the address bar and the history at once.
      history.replaceState(null, "", `${location.pathname}${location.hash}`);
      if (pending === null || query.get("state") !== pending.state) {
        throw new SignInRequired("the sign-in answer does not match the request");
      }
      await this.exchange({
        grant_type: "authorization_code",
        code,
        code_verifier: pending.verifier,
        redirect_uri: this.redirectUri,
        client_id: this.config.client_id,
      });
      return;
    }
    if (sessionStorage.getItem(REFRESH) === null) throw new SignInRequired("not signed in");
    await this.renew();
  }

  /** A fresh access token from the refresh token (one renewal at a time). */
  renew(): Promise<string> {
    if (this.renewing === null) {
      const refresh = sessionStorage.getItem(REFRESH);
      const request =
        refresh === null
          ? Promise.reject(new SignInRequired("no refresh token"))
          : this.exchange({
              grant_type: "refresh_token",
              refresh_token: refresh,
              client_id: this.config.client_id,
            });
      this.renewing = request.finally(() => {
        this.renewing = null;
      });
    }
    return this.renewing;
  }

  signOut(): void {
    sessionStorage.removeItem(REFRESH);
    this.accessToken = null;
    window.clearTimeout(this.timer);
    const end = this.config.end_session_endpoint;
    if (end) {
      const url = new URL(end);
      url.searchParams.set("post_logout_redirect_uri", this.redirectUri);
      url.searchParams.set("client_id", this.config.client_id);
      location.assign(url.toString());
    } else {
      location.assign(this.redirectUri);
    }
  }

  private async exchange(form: Record<string, string>): Promise<string> {
    let answer: Response;
    try {
      answer = await fetch(this.config.token_endpoint, {
        method: "POST",
        headers: { "Content-Type": "application/x-www-form-urlencoded" },
        body: new URLSearchParams(form).toString(),
      });
    } catch {
      this.schedule(5_000); // the network is down: keep the refresh token, try again
      throw new Error("the token endpoint cannot be reached");
    }
    if (answer.status === 401 || answer.status === 400) {
      sessionStorage.removeItem(REFRESH);
      throw new SignInRequired("sign in again");
    }
    if (!answer.ok) {
      const retry = Number(answer.headers.get("Retry-After") ?? "5");
      this.schedule(Math.max(1, retry) * 1000);
      throw new Error(`the identity provider is unavailable (HTTP ${answer.status})`);
    }
    const tokens = (await answer.json()) as TokenAnswer;
    this.accessToken = tokens.access_token;
    const lifetime = (tokens.expires_in ?? 300) * 1000;
    this.expiresAt = Date.now() + lifetime;
    if (tokens.refresh_token) sessionStorage.setItem(REFRESH, tokens.refresh_token);
    // Renew at three quarters of the lifetime: well before the socket's `auth_expiring`.
    this.schedule(Math.max(1_000, lifetime * 0.75));
    for (const resolve of this.waiting.splice(0)) resolve(tokens.access_token);
    return tokens.access_token;
  }

  /** The access token, renewed first if it has (nearly) expired: for a new connection. */
  async current(): Promise<string> {
    if (this.accessToken !== null && this.expiresAt > Date.now() + 5_000) return this.accessToken;
    return await this.renew();
  }

  /** A token that outlives `at` (epoch milliseconds: when the socket's token expires): the one
   * held if it is newer, else the renewal due before then, else a renewal now. Tokens shorter
   * than the server's notice come with a notice each: waiting for the renewal due anyway keeps
   * that to one renewal per three quarters of a lifetime. */
  async outliving(at: number): Promise<string> {
    if (this.accessToken !== null && this.expiresAt > at + 1000) return this.accessToken;
    if (this.renewAt > Date.now() && this.renewAt < at) {
      return await new Promise<string>((resolve) => this.waiting.push(resolve));
    }
    return await this.renew();
  }

  private schedule(delay: number): void {
    window.clearTimeout(this.timer);
    this.renewAt = Date.now() + delay;
    this.timer = window.setTimeout(() => {
      this.renew().catch(() => undefined);
    }, delay);
  }

  /** An authorised fetch: renews once on `token_expired`. */
  async api(path: string, init: RequestInit = {}): Promise<Response> {
    const send = (token: string | null) =>
      fetch(path, {
        ...init,
        headers: {
          Accept: "application/json",
          ...(init.headers ?? {}),
          Authorization: `Bearer ${token ?? ""}`,
          "X-Client-Platform": "web",
          "X-Client-Version": "1.0.0",
        },
      });
    let answer = await send(this.accessToken);
    if (answer.status === 401) answer = await send(await this.renew());
    return answer;
  }
}
