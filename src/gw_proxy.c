/*
 * gw_proxy.c - proxy routes (see gw_proxy.h).
 *
 * Life of a proxied request: it starts as soon as the request head is
 * read. The upstream request head is built once (kept for one retry), a
 * pooled or new upstream connection gets it, then the request body as it
 * arrives from the client (with its Content-Length, or re-chunked when the
 * client sent it chunked). gw_resp reads the response under its rules; its
 * head is filtered and written to the client, its body is streamed as it
 * arrives.
 *
 * Backpressure both ways: when the client falls behind, reading from the
 * backend pauses until the client's output drains; when the backend falls
 * behind on the request body, reading from the client pauses until the
 * upstream output drains. Memory per request stays a few hundred KiB
 * whatever the body sizes.
 *
 * Failures before any of the response reached the client become JSON
 * errors (502, 503, 504), also when its head was already queued
 * (gw_conn_take_back); after that, the client connection is closed so a cut
 * body never looks whole. A request sent on a reused connection that the backend had closed
 * (EOF or reset before any response byte) is sent once more on a fresh
 * connection when the method is idempotent and the body bytes sent so far
 * are still at hand (a body is kept for that up to REPLAY_MAX bytes).
 *
 * Ownership: the proxy context belongs to the client connection's async
 * slot. It is freed by proxy_free() on every end: finish, error, abort, or
 * cancel from the connection. Upstream callbacks end with
 * gw_conn_release(c) and touch nothing after it.
 */
#include "gw_proxy.h"
#include "gw_breaker.h"
#include "gw_budget.h"
#include "gw_config.h"
#include "gw_conn.h"
#include "gw_fail.h"
#include "gw_http.h"
#include "gw_log.h"
#include "gw_resp.h"
#include "gw_retry.h"
#include "gw_server.h"
#include "gw_upstream.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <inttypes.h>
#include <llhttp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

/* Pause reading the client's body above this much unsent upstream output;
 * resume below the low mark. */
#define UP_HIGH (256 * 1024)
#define UP_LOW (64 * 1024)
/* Request body bytes kept for a retry on a fresh connection. */
#define REPLAY_MAX (64 * 1024)

struct gw_proxy_s {
    gw_conn_t *c;
    const gw_route_t *route;
    const gw_backend_t *b;
    gw_upstream_t *u;
    struct event *timer;  /* the backend's timeout_ms for the whole call */
    char *head;           /* the upstream request head, kept for a retry */
    size_t head_len, head_cap;
    char *hout;           /* the filtered response head */
    size_t hout_cap;
    gw_proxy_t *next_free; /* in the worker's cache */
    struct evbuffer *replay; /* the framed body sent so far, while it fits REPLAY_MAX */
    size_t replay_held;   /* its bytes, taken from gw_budget_bodies */
    bool has_body;        /* the client's request has a body */
    bool body_sent;       /* all of it went upstream (the chunked end included) */
    bool body_paused;     /* the client's body waits for the upstream output to drain */
    gw_resp_t rd;         /* the response being read (gw_resp.h) */
    bool retried;
    bool got_bytes;       /* a response byte arrived on this attempt */
    bool head_sent;       /* the response head went to the client */
    bool done;            /* the whole response was read */
    int status;
    /* retries (the backend's "retry"; see "retries" below) */
    struct event *rtimer; /* the backoff sleep; made on first use */
    uint64_t end_ms;      /* when the backend's timeout_ms ends the request */
    unsigned attempt;     /* tries started, the first included */
    int retry_ms;         /* the sleep decided for the next try */
    bool counted;         /* in the backend's requests in flight (retry budget) */
    bool slot;            /* the next try (or the one in flight) holds a retry budget slot */
    bool retry_status;    /* the response head has a retried status: not passed on */
    /* the response head, collected as llhttp hands it over */
    char *hbuf;
    size_t hlen, hcap;
    gw_header_t *hdrs;
    size_t nhdrs, hdrs_cap;
    bool in_field, in_value;
    bool admitted;        /* the breaker let it through: its outcome is reported once, by proxy_free() */
    int outcome;          /* for the breaker: 1 ok, -1 failed, 0 unknown (cancelled: abandoned) */
    gw_upstream_wait_t wait; /* queued for a connection of a full pool */
    /* metrics: one backend call per proxied request, its retries included */
    uint64_t start_us;    /* 0: it never got as far as the backend's admission */
    bool ended;           /* end_code says how it ended; else it was cancelled (client gone) */
    gw_fail_t end_code;   /* GW_FAIL_NONE: an answer below 500 */
};

static const gw_resp_ops_t resp_ops;
static void proxy_read_cb(gw_upstream_t *u, void *arg);
static bool proxy_retry(gw_proxy_t *p, gw_fail_t code, int err);
static bool proxy_retry_head(gw_proxy_t *p);
static void proxy_retry_free(gw_proxy_t *p);
static void proxy_event_cb(gw_upstream_t *u, int what, void *arg);
static void proxy_write_cb(gw_upstream_t *u, void *arg);

/* --- the upstream request ------------------------------------------------ */

static bool
keep_byte(unsigned char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           strchr("-._~!$&'()*+,;=:@", ch) != NULL;
}

size_t
gw_proxy_target(const gw_req_t *req, size_t strip, char *out, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t w = 0;
    for (size_t i = strip; i < req->path.nseg; i++) {
        const unsigned char *seg = (const unsigned char *)req->path.buf + req->path.off[i];
        if (w + 1 >= cap)
            return 0;
        out[w++] = '/';
        for (size_t k = 0; k < req->path.len[i]; k++) {
            if (w + 4 >= cap)
                return 0;
            if (seg[k] && keep_byte(seg[k])) {
                out[w++] = (char)seg[k];
            } else {
                out[w++] = '%';
                out[w++] = hex[seg[k] >> 4];
                out[w++] = hex[seg[k] & 15];
            }
        }
    }
    /* Keep a trailing slash: "/dir/" and "/dir" may differ to the backend. */
    bool trailing = req->path_len > 1 && req->hbuf[req->path_off + req->path_len - 1] == '/';
    if (w == 0 || (trailing && out[w - 1] != '/')) {
        if (w + 1 >= cap)
            return 0;
        out[w++] = '/';
    }
    if (req->query_len) {
        if (w + 1 + req->query_len >= cap)
            return 0;
        out[w++] = '?';
        memcpy(out + w, req->hbuf + req->query_off, req->query_len);
        w += req->query_len;
    }
    out[w] = '\0';
    return w;
}

static bool
name_eq(const char *a, size_t alen, const char *b)
{
    return alen == strlen(b) && strncasecmp(a, b, alen) == 0;
}

/* True when the comma-separated token list (a Connection value) names h. */
static bool
listed_in(const char *list, size_t list_len, const char *h, size_t hlen)
{
    size_t i = 0;
    while (i < list_len) {
        while (i < list_len && (list[i] == ' ' || list[i] == '\t' || list[i] == ','))
            i++;
        size_t start = i;
        while (i < list_len && list[i] != ',' && list[i] != ' ' && list[i] != '\t')
            i++;
        if (i - start == hlen && strncasecmp(list + start, h, hlen) == 0)
            return true;
    }
    return false;
}

/* True when one of the n Connection fields among hdrs (offsets into base)
 * names h: several Connection lines form one list (RFC 9110 5.3). */
static bool
named_by_connection(const char *base, const gw_header_t *hdrs, size_t n, const char *h, size_t hlen)
{
    for (size_t i = 0; i < n; i++)
        if (name_eq(base + hdrs[i].name_off, hdrs[i].name_len, "connection") &&
            listed_in(base + hdrs[i].value_off, hdrs[i].value_len, h, hlen))
            return true;
    return false;
}

static bool
name_in(const char *name, size_t len, const char *const *list)
{
    for (; *list; list++)
        if (name_eq(name, len, *list))
            return true;
    return false;
}

/* Hop-by-hop headers (RFC 9110 7.6.1). */
static const char *const hop_by_hop[] = { "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
                                          "proxy-connection", "proxy-authenticate", "proxy-authorization", NULL };
/* Request headers gatherd writes itself (or drops: Expect, the body is sent whole). */
static const char *const set_upstream[] = { "host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via",
                                            "x-request-id", "content-length", "expect", NULL };
/* Response headers gatherd writes itself. */
static const char *const set_downstream[] = { "date", "server", "content-length", "x-request-id", NULL };

/* Whether header i of hdrs (offsets into base) is dropped: hop-by-hop, named
 * by a Connection field, or one of own (written by gatherd). */
static bool
dropped(const char *base, const gw_header_t *hdrs, size_t n, size_t i, const char *const *own)
{
    const char *name = base + hdrs[i].name_off;
    size_t len = hdrs[i].name_len;
    return name_in(name, len, hop_by_hop) || name_in(name, len, own) ||
           named_by_connection(base, hdrs, n, name, len);
}

static void
buf_add(char **buf, size_t *len, size_t *cap, const char *s, size_t n)
{
    gw_grow((void **)buf, cap, *len + n + 1, 1);
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = '\0';
}

/* Appends every value of the list header name, each followed by ", "
 * (repeated fields of a list header are one list, RFC 9110 5.3). */
static void
add_list(const gw_req_t *r, const char *name, char **buf, size_t *len, size_t *cap)
{
    for (size_t i = 0; i < r->nheaders; i++) {
        const gw_header_t *h = &r->headers[i];
        if (!name_eq(r->hbuf + h->name_off, h->name_len, name) || h->value_len == 0)
            continue;
        buf_add(buf, len, cap, r->hbuf + h->value_off, h->value_len);
        buf_add(buf, len, cap, ", ", 2);
    }
}

#define ADD(s, n) buf_add(&head, &len, &cap, (s), (n))
#define ADD_STR(s) ADD((s), strlen(s))

void
gw_proxy_add_forwarding(gw_conn_t *c, char **buf, size_t *blen, size_t *bcap)
{
    gw_req_t *r = gw_conn_req(c);
    char *head = *buf;
    size_t len = *blen, cap = *bcap;
    size_t host_len = 0;
    const char *host = gw_req_host(r, &host_len); /* checked host[:port] (gw_http.c) */
    ADD("X-Forwarded-For: ", 17);
    if (gw_conn_peer_trusted(c)) /* else the client's list is not believed: replaced */
        add_list(r, "x-forwarded-for", &head, &len, &cap);
    ADD_STR(gw_conn_peer_ip(c));
    ADD("\r\nX-Forwarded-Proto: http\r\n", 27);
    if (host) {
        ADD("X-Forwarded-Host: ", 18);
        ADD(host, host_len);
        ADD("\r\n", 2);
    }
    ADD("Via: ", 5);
    add_list(r, "via", &head, &len, &cap);
    ADD("1.1 gatherd\r\nX-Request-Id: ", 27);
    ADD_STR(r->request_id);
    ADD("\r\n", 2);
    *buf = head;
    *blen = len;
    *bcap = cap;
}

static void
build_request(gw_proxy_t *p)
{
    gw_req_t *r = gw_conn_req(p->c);
    char *head = p->head;
    size_t len = 0, cap = p->head_cap;
    /* The re-encoded target: every byte of the normalized path at most
     * three ("%XX") plus its "/", then "?" and the query as received. Sized
     * from the request (http.max_url_bytes allows up to 1 MiB), never cut:
     * a fixed 9000 bytes once turned a long target into an empty one. */
    char stack[4096];
    size_t need = 3 * (r->path_len + r->path.nseg) + r->query_len + 8;
    char *target = need <= sizeof(stack) ? stack : gw_malloc(need);
    size_t tlen = gw_proxy_target(r, p->route->proxy.strip_segments, target, need);
    const char *method = llhttp_method_name((llhttp_method_t)r->method);
    ADD_STR(method);
    ADD(" ", 1);
    ADD(target, tlen);
    if (target != stack)
        free(target);
    ADD(" HTTP/1.1\r\n", 11);
    size_t host_len = 0;
    const char *host = gw_req_host(r, &host_len);
    ADD("Host: ", 6);
    if (p->route->proxy.preserve_host && host)
        ADD(host, host_len);
    else
        ADD_STR(p->b->host_header);
    ADD("\r\n", 2);
    for (size_t i = 0; i < r->nheaders; i++) {
        const gw_header_t *h = &r->headers[i];
        const char *name = r->hbuf + h->name_off;
        if (dropped(r->hbuf, r->headers, r->nheaders, i, set_upstream))
            continue;
        ADD(name, h->name_len);
        ADD(": ", 2);
        ADD(r->hbuf + h->value_off, h->value_len);
        ADD("\r\n", 2);
    }
    gw_proxy_add_forwarding(p->c, &head, &len, &cap);
    if (r->chunked) {
        ADD_STR("Transfer-Encoding: chunked\r\n");
    } else if (r->has_body || r->method == HTTP_POST || r->method == HTTP_PUT || r->method == HTTP_PATCH) {
        /* The length gatherd's parser reads the body by (0 to INT64_MAX,
         * gw_http.h), written by us: forward_body() sends exactly that many
         * bytes or the upstream connection is closed. */
        char cl[48];
        int n = snprintf(cl, sizeof(cl), "Content-Length: %" PRIu64 "\r\n",
                         r->has_body ? (uint64_t)r->content_length : 0);
        ADD(cl, (size_t)n);
    }
    ADD("\r\n", 2);
    p->head = head;
    p->head_len = len;
    p->head_cap = cap;
}

#undef ADD
#undef ADD_STR

/* --- endings ------------------------------------------------------------- */

/* Proxy contexts kept per worker for the next request, with their timer
 * and buffers: a request then allocates nothing of its own. */
#define CACHE_MAX 256

static void
proxy_destroy(gw_proxy_t *p)
{
    event_free(p->timer);
    if (p->rtimer)
        event_free(p->rtimer);
    free(p->head);
    free(p->hout);
    free(p->hbuf);
    free(p->hdrs);
    free(p);
}

/* Frees the copy of the body kept for a retry, and gives its budget back. */
static void
replay_drop(gw_proxy_t *p)
{
    if (p->replay) {
        evbuffer_free(p->replay);
        p->replay = NULL;
    }
    if (p->replay_held) {
        gw_budget_give(&gw_budget_bodies, p->replay_held);
        p->replay_held = 0;
    }
}

/* Ends p: its upstream connection is pooled when reusable, else closed. */
static void
proxy_free(gw_proxy_t *p, bool reusable)
{
    gw_worker_t *w = gw_conn_worker(p->c);
    if (p->start_us)
        gw_m_call(w->m, p->b->mid, p->ended ? p->end_code : GW_FAIL_CANCELLED, gw_now_us() - p->start_us);
    proxy_retry_free(p);
    gw_upstream_wait_cancel(&p->wait);
    if (p->admitted && p->outcome)
        gw_breaker_done(p->b, p->outcome > 0);
    else if (p->admitted)
        gw_breaker_abandon(p->b);
    if (p->u)
        gw_upstream_release(p->u, reusable);
    evtimer_del(p->timer);
    replay_drop(p);
    if (w->nproxy_cache >= CACHE_MAX || w->stopping) {
        proxy_destroy(p);
        return;
    }
    /* keep the allocations, reset the rest */
    struct event *timer = p->timer, *rtimer = p->rtimer;
    char *head = p->head, *hout = p->hout, *hbuf = p->hbuf;
    size_t head_cap = p->head_cap, hout_cap = p->hout_cap, hcap = p->hcap, hdrs_cap = p->hdrs_cap;
    gw_header_t *hdrs = p->hdrs;
    memset(p, 0, sizeof(*p));
    p->timer = timer;
    p->rtimer = rtimer;
    p->head = head;
    p->head_cap = head_cap;
    p->hout = hout;
    p->hout_cap = hout_cap;
    p->hbuf = hbuf;
    p->hcap = hcap;
    p->hdrs = hdrs;
    p->hdrs_cap = hdrs_cap;
    p->next_free = w->proxy_cache;
    w->proxy_cache = p;
    w->nproxy_cache++;
}

void
gw_proxy_worker_free(gw_worker_t *w)
{
    while (w->proxy_cache) {
        gw_proxy_t *p = w->proxy_cache;
        w->proxy_cache = p->next_free;
        proxy_destroy(p);
    }
    w->nproxy_cache = 0;
}

static void
proxy_cancel(void *ctx)
{
    proxy_free(ctx, false);
}

static void
proxy_drained(void *ctx)
{
    gw_proxy_t *p = ctx;
    if (p->u)
        gw_upstream_read(p->u, true);
}

/* Keeps a copy of n body bytes for a retry while the body fits REPLAY_MAX
 * and the memory budget of request bodies (memory.request_body_bytes);
 * past either, a retry is no longer possible. */
static void
replay_add(gw_proxy_t *p, const void *data, size_t n)
{
    if (p->replay == NULL)
        return;
    if (evbuffer_get_length(p->replay) + n > REPLAY_MAX || !gw_budget_take(&gw_budget_bodies, n)) {
        replay_drop(p);
        return;
    }
    p->replay_held += n;
    evbuffer_add(p->replay, data, n);
}

static void
body_add(gw_proxy_t *p, struct evbuffer *out, const void *data, size_t n)
{
    replay_add(p, data, n);
    evbuffer_add(out, data, n);
}

/* Moves the client's body bytes at hand upstream (framed as the upstream
 * request says), and pauses the client when the upstream output is full. */
static void
forward_body(gw_proxy_t *p)
{
    if (p->u == NULL || p->body_sent)
        return;
    gw_req_t *r = gw_conn_req(p->c);
    struct evbuffer *out = gw_upstream_output(p->u);
    size_t n = evbuffer_get_length(r->body);
    if (n > 0) {
        if (r->chunked) {
            char size[24];
            int k = snprintf(size, sizeof(size), "%zx\r\n", n);
            body_add(p, out, size, (size_t)k);
        }
        if (p->replay && evbuffer_get_length(p->replay) + n <= REPLAY_MAX) {
            replay_add(p, evbuffer_pullup(r->body, -1), n);
        } else {
            replay_drop(p); /* too much to keep: no retry from here on */
        }
        evbuffer_add_buffer(out, r->body);
        if (r->chunked)
            body_add(p, out, "\r\n", 2);
    }
    if (gw_conn_body_done(p->c)) {
        if (r->chunked)
            body_add(p, out, "0\r\n\r\n", 5);
        p->body_sent = true;
    }
    gw_upstream_send(p->u);
    if (!p->body_sent && evbuffer_get_length(out) > UP_HIGH && !p->body_paused) {
        p->body_paused = true;
        gw_conn_body_pause(p->c, true); /* proxy_write_cb resumes it */
    }
}

static void
proxy_body(void *ctx)
{
    forward_body(ctx);
}

static const gw_conn_async_t proxy_ops = { proxy_cancel, proxy_drained, proxy_body };

/* How p ended, for the metrics; proxy_free() counts it. */
static void
proxy_ended(gw_proxy_t *p, gw_fail_t code)
{
    p->ended = true;
    p->end_code = code;
}

/* Ends the request with an error (its status: gw_fail_status); called from
 * upstream callbacks only. */
static void
proxy_fail(gw_proxy_t *p, gw_fail_t code, const char *doing, int err)
{
    gw_conn_t *c = p->c;
    proxy_ended(p, code);
    gw_req_t *r = gw_conn_req(c);
    gw_log_rl(GW_LOG_ERR, "backend %s (%s): %s%s%s while %s, client %s, request %s", p->b->name, p->b->host_header,
           gw_fail_proxy_name(code), err ? ": " : "", err ? strerror(err) : "", doing, gw_conn_peer_ip(c),
           r->request_id);
    if (p->u) {
        p->u->broken = true;
        p->outcome = -1; /* it reached the backend (a queue or local failure says nothing about it) */
    }
    if (p->head_sent && !gw_conn_take_back(c)) {
        /* part of the response reached the client: only closing is left */
        proxy_free(p, false);
        gw_conn_abort(c);
    } else {
        char extra[256];
        snprintf(extra, sizeof(extra), ",\"backend\":\"%s\"", p->b->name);
        proxy_free(p, false);
        gw_conn_error(c, gw_fail_status(code), gw_fail_proxy_name(code), extra);
    }
}

/* --- sending ------------------------------------------------------------- */

static int
send_attempt(gw_proxy_t *p, bool fresh)
{
    gw_worker_t *w = gw_conn_worker(p->c);
    gw_upstream_t *u = NULL;
    int rc = gw_upstream_get(w, p->b, fresh, &u);
    if (rc != GW_OK)
        return rc;
    p->u = u;
    p->got_bytes = false;
    gw_resp_init(&p->rd, &resp_ops, p, INT64_MAX, gw_conn_req(p->c)->method == HTTP_HEAD);
    gw_upstream_setcb(u, proxy_read_cb, proxy_write_cb, proxy_event_cb, p, UP_LOW);
    struct evbuffer *out = gw_upstream_output(u);
    evbuffer_add(out, p->head, p->head_len);
    if (p->replay) /* a retry: first what the failed attempt sent */
        evbuffer_add(out, evbuffer_pullup(p->replay, -1), evbuffer_get_length(p->replay));
    forward_body(p);
    return GW_OK;
}

/* The connection broke before any response byte: retry once when that is
 * safe, else fail. err: errno, or 0 for EOF. */
static void
upstream_broke(gw_proxy_t *p, int err)
{
    gw_conn_t *c = p->c;
    bool replayable = !p->has_body || p->replay != NULL;
    if (p->u->reused && !p->retried && !p->got_bytes && replayable && gw_http_idempotent(gw_conn_req(c)->method)) {
        gw_log_rl(GW_LOG_INFO, "backend %s: reused connection closed before a response (%s); retrying on a new one",
               p->b->name, err ? strerror(err) : "EOF");
        p->retried = true;
        gw_upstream_release(p->u, false);
        p->u = NULL;
        int rc = send_attempt(p, true);
        if (rc == GW_OK)
            return;
        if (rc == GW_AGAIN) {
            proxy_fail(p, GW_FAIL_UNAVAILABLE, "retrying (max_connections reached)", 0);
            return;
        }
        proxy_fail(p, GW_FAIL_CONNECT_FAILED, "connecting to upstream", errno);
        return;
    }
    if (proxy_retry(p, p->got_bytes ? GW_FAIL_BAD_RESPONSE : GW_FAIL_RESET, err))
        return;
    if (p->got_bytes)
        proxy_fail(p, GW_FAIL_BAD_RESPONSE, "reading response header from upstream", err);
    else
        proxy_fail(p, GW_FAIL_RESET, "reading response header from upstream", err);
}

/* --- the response -------------------------------------------------------- */

#define PROXY(r) ((gw_proxy_t *)(r)->arg)

/* Limits of the collected head: gw_resp counts names and values and
 * fields (GW_RESP_HEAD_MAX, GW_RESP_FIELDS_MAX) before they get here. */
static void
hbuf_add(gw_proxy_t *p, const char *at, size_t len)
{
    gw_grow((void **)&p->hbuf, &p->hcap, p->hlen + len, 1);
    memcpy(p->hbuf + p->hlen, at, len);
    p->hlen += len;
}

static int
on_resp_field(gw_resp_t *r, const char *at, size_t len)
{
    gw_proxy_t *p = PROXY(r);
    if (!p->in_field) {
        gw_grow((void **)&p->hdrs, &p->hdrs_cap, p->nhdrs + 1, sizeof(gw_header_t));
        gw_header_t *h = &p->hdrs[p->nhdrs];
        memset(h, 0, sizeof(*h));
        h->name_off = (uint32_t)p->hlen;
        p->in_field = true;
        p->in_value = false;
    }
    p->hdrs[p->nhdrs].name_len += (uint32_t)len;
    hbuf_add(p, at, len);
    return GW_OK;
}

static int
on_resp_value(gw_resp_t *r, const char *at, size_t len)
{
    gw_proxy_t *p = PROXY(r);
    gw_header_t *h = &p->hdrs[p->nhdrs];
    if (!p->in_value) {
        h->value_off = (uint32_t)p->hlen;
        p->in_value = true;
    }
    h->value_len += (uint32_t)len;
    hbuf_add(p, at, len);
    return GW_OK;
}

static int
on_resp_value_complete(gw_resp_t *r)
{
    gw_proxy_t *p = PROXY(r);
    gw_header_t *h = &p->hdrs[p->nhdrs];
    if (!p->in_value)
        h->value_off = (uint32_t)p->hlen;
    /* gw_resp refused control characters (a CR or LF never reaches the client) */
    const char *v = p->hbuf + h->value_off;
    while (h->value_len && (v[h->value_len - 1] == ' ' || v[h->value_len - 1] == '\t'))
        h->value_len--;
    p->nhdrs++;
    p->in_field = p->in_value = false;
    return GW_OK;
}

/* An interim (1xx) head was skipped: its fields go. */
static void
on_resp_interim(gw_resp_t *r)
{
    gw_proxy_t *p = PROXY(r);
    p->hlen = p->nhdrs = 0;
    p->in_field = p->in_value = false;
}

void
gw_proxy_response_head(const char *base, const gw_header_t *hdrs, size_t n, char **out, size_t *len, size_t *cap)
{
    for (size_t i = 0; i < n; i++) {
        const gw_header_t *h = &hdrs[i];
        if (dropped(base, hdrs, n, i, set_downstream))
            continue;
        buf_add(out, len, cap, base + h->name_off, h->name_len);
        buf_add(out, len, cap, ": ", 2);
        buf_add(out, len, cap, base + h->value_off, h->value_len);
        buf_add(out, len, cap, "\r\n", 2);
    }
}

static int
on_resp_headers_complete(gw_resp_t *r)
{
    gw_proxy_t *p = PROXY(r);
    p->status = r->status;
    if (proxy_retry_head(p)) {
        p->retry_status = true; /* nothing was sent to the client: proxy_read_cb retries */
        return GW_ERR;
    }
    /* Filter the head: hop-by-hop headers, those named in Connection, and
     * those gatherd writes itself (Date, Server, ...). */
    char *out = p->hout;
    size_t len = 0, cap = p->hout_cap;
    gw_proxy_response_head(p->hbuf, p->hdrs, p->nhdrs, &out, &len, &cap);
    /* The backend's Content-Length (at most 2^63-1: gw_resp), which for
     * HEAD and 304 is the representation's, passed as it is; none when it
     * sent none (never an invented 0). A 204 has none. */
    gw_conn_start_response(p->c, p->status, out ? out : "", len, p->status == 204 ? -1 : r->content_length);
    p->hout = out; /* kept for the next response */
    p->hout_cap = cap;
    p->head_sent = true;
    return GW_OK;
}

static int
on_resp_body(gw_resp_t *r, const char *at, size_t len)
{
    gw_conn_body(PROXY(r)->c, at, len);
    return GW_OK;
}

static const gw_resp_ops_t resp_ops = {
    .head = on_resp_headers_complete,
    .body = on_resp_body,
    .field = on_resp_field,
    .value = on_resp_value,
    .value_done = on_resp_value_complete,
    .reset = on_resp_interim,
};

/* The response is complete: pool the connection when it can serve another
 * request, and end the client's response. */
static void
proxy_finish(gw_proxy_t *p)
{
    gw_conn_t *c = p->c;
    /* A response that came before the whole request body was sent leaves
     * the connection mid-request: never reused. */
    bool reusable = gw_resp_keep_alive(&p->rd) && (p->body_sent || !p->has_body) &&
                    evbuffer_get_length(gw_upstream_input(p->u)) == 0;
    p->outcome = p->status >= 500 ? -1 : 1;
    proxy_ended(p, p->status >= 500 ? GW_FAIL_BAD_STATUS : GW_FAIL_NONE);
    proxy_free(p, reusable);
    gw_conn_end_response(c);
}

static void
proxy_read_cb(gw_upstream_t *u, void *arg)
{
    gw_proxy_t *p = arg;
    gw_conn_t *c = p->c;
    struct evbuffer *in = gw_upstream_input(u);
    p->got_bytes = true;
    while (!p->done && evbuffer_get_length(in) > 0) {
        struct evbuffer_iovec v;
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1)
            break;
        size_t used;
        gw_resp_result_t rc = gw_resp_execute(&p->rd, v.iov_base, v.iov_len, &used);
        if (rc != GW_RESP_ERROR) {
            evbuffer_drain(in, used);
            p->done = rc == GW_RESP_DONE;
        } else if (p->retry_status) {
            proxy_retry(p, GW_FAIL_NONE, 0); /* decided in on_resp_headers_complete */
            gw_conn_release(c);
            return;
        } else {
            gw_log_rl(GW_LOG_ERR, "backend %s: invalid response: %s", p->b->name, p->rd.why);
            proxy_fail(p, GW_FAIL_BAD_RESPONSE,
                       p->head_sent ? "reading response body from upstream" : "reading response header from upstream",
                       0);
            gw_conn_release(c);
            return;
        }
    }
    if (p->done)
        proxy_finish(p);
    else if (p->head_sent && !gw_conn_send(c))
        gw_upstream_read(u, false); /* proxy_drained() resumes */
    gw_conn_release(c);
}

/* The upstream output drained: take more of the client's body. Ends an
 * upstream callback: may hand over body bytes or end p, so nothing is
 * touched after it. */
static void
resume_body(gw_proxy_t *p)
{
    gw_conn_t *c = p->c;
    p->body_paused = false;
    gw_conn_body_pause(c, false);
    gw_conn_release(c);
}

/* The upstream output fell to UP_LOW. */
static void
proxy_write_cb(gw_upstream_t *u, void *arg)
{
    gw_proxy_t *p = arg;
    GW_UNUSED(u);
    if (p->body_paused)
        resume_body(p);
}

static void
proxy_event_cb(gw_upstream_t *u, int what, void *arg)
{
    gw_proxy_t *p = arg;
    gw_conn_t *c = p->c;
    int err = u->err;
    if (what & GW_UP_CONNECTED) {
        if (p->body_paused && evbuffer_get_length(gw_upstream_output(u)) <= UP_LOW)
            resume_body(p); /* the connect wrote what the body had queued */
        return;
    }
    if (u->resolve_failed) {
        char doing[320];
        snprintf(doing, sizeof(doing), "resolving \"%s\": %s", p->b->host_name, gw_upstream_resolve_error(u));
        proxy_fail(p, GW_FAIL_RESOLVE_FAILED, doing, 0);
    } else if (what & GW_UP_TIMEOUT) {
        if (!proxy_retry(p, GW_FAIL_TIMEOUT, 0))
            proxy_fail(p, GW_FAIL_TIMEOUT, "connecting to upstream", 0);
    } else if (gw_upstream_tls_failed(u)) {
        char why[256];
        gw_log_rl(GW_LOG_ERR, "backend %s (%s): TLS handshake failed: %s", p->b->name, p->b->host_header,
               gw_upstream_tls_error(u, why, sizeof(why)));
        proxy_fail(p, GW_FAIL_TLS_FAILED, "handshaking with upstream", 0);
    } else if (!u->connected) {
        if (!proxy_retry(p, GW_FAIL_CONNECT_FAILED, err))
            proxy_fail(p, GW_FAIL_CONNECT_FAILED, "connecting to upstream", err);
    } else if (what & GW_UP_EOF) {
        if (p->head_sent && gw_resp_eof(&p->rd) == GW_RESP_DONE) {
            /* a close-delimited body ends here */
            p->done = true;
            p->outcome = p->status >= 500 ? -1 : 1;
            proxy_ended(p, p->status >= 500 ? GW_FAIL_BAD_STATUS : GW_FAIL_NONE);
            proxy_free(p, false);
            gw_conn_end_response(c);
        } else if (p->head_sent) {
            proxy_fail(p, GW_FAIL_TRUNCATED, "reading response body from upstream", 0);
        } else {
            upstream_broke(p, 0);
        }
    } else {
        if (p->head_sent)
            proxy_fail(p, GW_FAIL_TRUNCATED, "reading response body from upstream", err);
        else
            upstream_broke(p, err);
    }
    gw_conn_release(c);
}

static void
proxy_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_proxy_t *p = arg;
    gw_conn_t *c = p->c;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    const char *doing = p->head_sent                  ? "reading response body from upstream"
                        : p->u == NULL                ? "waiting in the backend's queue for a connection"
                        : p->u->waiting               ? "resolving the backend's name"
                        : p->u && !p->u->connected    ? "connecting to upstream"
                                                      : "waiting for the response from upstream";
    proxy_fail(p, GW_FAIL_TIMEOUT, doing, 0);
    gw_conn_release(c);
}

/* Answers 503 code with its Retry-After, before anything was sent (from
 * gw_proxy_start() or a queue callback). */
static void
proxy_refuse(gw_proxy_t *p, gw_fail_t code, const char *why)
{
    gw_conn_t *c = p->c;
    char extra[256], hdr[40];
    int retry_s = gw_fail_retry_after(code);
    if (retry_s < 0)
        retry_s = gw_breaker_retry_after_s(p->b);
    /* an open circuit was logged once when it opened */
    gw_log_rl(code == GW_FAIL_CIRCUIT_OPEN ? GW_LOG_INFO : GW_LOG_WARN, "backend %s (%s): %s: %s, client %s, request %s",
           p->b->name, p->b->host_header, gw_fail_proxy_name(code), why, gw_conn_peer_ip(c),
           gw_conn_req(c)->request_id);
    snprintf(extra, sizeof(extra), ",\"backend\":\"%s\"", p->b->name);
    snprintf(hdr, sizeof(hdr), "Retry-After: %d\r\n", retry_s);
    proxy_ended(p, code);
    proxy_free(p, false);
    gw_conn_error_headers(c, gw_fail_status(code), gw_fail_proxy_name(code), extra, hdr);
}

/* p waited in its backend's queue: a connection may be free now, or
 * queue_timeout_ms passed. */
static void
proxy_wait_cb(gw_upstream_wait_t *wt, int status, void *arg)
{
    gw_proxy_t *p = arg;
    gw_conn_t *c = p->c;
    GW_UNUSED(wt);
    if (status != GW_OK) {
        proxy_refuse(p, GW_FAIL_QUEUE_TIMEOUT, "no connection within queue_timeout_ms");
        gw_conn_release(c);
        return;
    }
    int rc = send_attempt(p, false);
    if (rc == GW_AGAIN && gw_upstream_wait(gw_conn_worker(c), p->b, &p->wait, proxy_wait_cb, p) == GW_OK) {
        gw_conn_release(c); /* taken by another: wait again */
        return;
    }
    if (rc == GW_AGAIN) {
        proxy_refuse(p, GW_FAIL_QUEUE_FULL, "its queue is full (max_pending)");
    } else if (rc != GW_OK) {
        proxy_fail(p, GW_FAIL_CONNECT_FAILED, "connecting to upstream", errno);
    } else if (!p->body_paused) {
        gw_conn_body_pause(c, false); /* the body goes upstream now (unless the upstream output is full already) */
    }
    gw_conn_release(c);
}

/* --- retries --------------------------------------------------------------- */

/*
 * With the backend's "retry" section, a proxied request is sent again
 * (after a full-jitter sleep, while tries are left, within the backend's
 * timeout_ms and the retry budget) when nothing of the response has
 * reached the client yet and the request can be replayed (no body, or the
 * body sent so far is still at hand: up to REPLAY_MAX bytes). Retried:
 * connect failures and connect timeouts, a reset or EOF before the
 * response head, and a listed status when the request's body was sent
 * whole (the response is then dropped, its connection closed). A request
 * whose body is still streaming from the client is never retried on a
 * status: the backend may have acted on part of it.
 */

static void
proxy_retry_begin(gw_proxy_t *p)
{
    const gw_retry_conf_t *rc = p->b->retry;
    p->attempt = 1;
    p->end_ms = gw_now_ms() + (uint64_t)p->b->timeout_ms;
    if (rc->counted) {
        p->counted = true;
        gw_retry_request_begin(rc);
    }
}

/* p ends: its budget slot and count are given back. */
static void
proxy_retry_free(gw_proxy_t *p)
{
    const gw_retry_conf_t *rc = p->b ? p->b->retry : NULL;
    if (p->slot)
        gw_retry_release(rc);
    if (p->counted)
        gw_retry_request_end(rc);
    p->slot = p->counted = false;
    if (p->rtimer)
        evtimer_del(p->rtimer);
}

/* The try in flight failed (why): whether another may follow. True with a
 * budget slot taken and p->retry_ms set. */
static bool
proxy_retry_decide(gw_proxy_t *p, const char *why)
{
    const gw_retry_conf_t *rc = p->b->retry;
    gw_req_t *r = gw_conn_req(p->c);
    if (p->slot) {
        gw_retry_release(rc);
        p->slot = false;
    }
    if (!rc->enabled || p->attempt == 0 || p->attempt >= rc->attempts || p->head_sent ||
        !gw_retry_method_ok(rc, r->method) || (p->has_body && p->replay == NULL))
        return false;
    int ms = gw_retry_backoff_ms(rc, p->attempt);
    if (gw_now_ms() + (uint64_t)ms >= p->end_ms) {
        gw_log_rl(GW_LOG_INFO, "backend %s: %s; no retry: a %d ms backoff would end after timeout_ms, request %s",
               p->b->name, why, ms, r->request_id);
        return false;
    }
    if (!gw_retry_acquire(rc)) {
        gw_log_rl(GW_LOG_INFO, "backend %s: %s; no retry: the retry budget is spent, request %s", p->b->name, why,
               r->request_id);
        return false;
    }
    p->slot = true;
    p->retry_ms = ms;
    if (p->admitted) {
        /* the breaker hears how this try went (a retried 4xx is an answer, not a failure); the
         * next try asks it again. Without a retry proxy_free() reports, as for any request. */
        gw_breaker_done(p->b, p->status >= 400 && p->status < 500);
        p->admitted = false;
        p->outcome = 0;
    }
    return true;
}

/* A response head arrived: whether its status is retried (decided, with a
 * slot taken); else the try is over and its slot is given back. */
static bool
proxy_retry_head(gw_proxy_t *p)
{
    const gw_retry_conf_t *rc = p->b->retry;
    if (rc->enabled && gw_retry_status(rc, p->status) && (!p->has_body || (p->body_sent && p->replay)))
        return proxy_retry_decide(p, "status");
    if (p->slot) {
        gw_retry_release(rc);
        p->slot = false;
    }
    return false;
}

static void
proxy_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_proxy_t *p = arg;
    gw_conn_t *c = p->c;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    p->attempt++;
    if (gw_breaker_admit(p->b, NULL) != GW_OK) {
        proxy_refuse(p, GW_FAIL_CIRCUIT_OPEN, "its circuit breaker opened before a retry");
        gw_conn_release(c);
        return;
    }
    p->admitted = p->b->breaker != NULL;
    int rc = send_attempt(p, false);
    if (rc == GW_AGAIN && p->b->max_pending > 0) {
        /* max_connections in use: wait for one (proxy_wait_cb), as a first try does */
        if (gw_upstream_wait(gw_conn_worker(c), p->b, &p->wait, proxy_wait_cb, p) == GW_OK)
            gw_conn_body_pause(c, true);
        else
            proxy_refuse(p, GW_FAIL_QUEUE_FULL, "its queue is full (max_pending)");
    } else if (rc == GW_AGAIN) {
        proxy_fail(p, GW_FAIL_UNAVAILABLE, "retrying (max_connections reached)", 0);
    } else if (rc != GW_OK) {
        proxy_fail(p, GW_FAIL_CONNECT_FAILED, "connecting to upstream", errno);
    }
    gw_conn_release(c);
}

/*
 * The try in flight failed with code (GW_FAIL_NONE: a retried status that
 * on_resp_headers_complete already decided on): when another try may
 * follow, its connection is closed and the sleep starts; true then.
 */
static bool
proxy_retry(gw_proxy_t *p, gw_fail_t code, int err)
{
    if (code != GW_FAIL_NONE && !proxy_retry_decide(p, gw_fail_proxy_name(code)))
        return false;
    gw_log_rl(GW_LOG_INFO, "backend %s: %s%s%s; retry %u of %u in %d ms, request %s", p->b->name,
           code != GW_FAIL_NONE ? gw_fail_proxy_name(code) : "status", err ? ": " : "", err ? strerror(err) : "",
           p->attempt, p->b->retry->attempts - 1, p->retry_ms, gw_conn_req(p->c)->request_id);
    if (code == GW_FAIL_NONE && p->status)
        gw_log_rl(GW_LOG_INFO, "backend %s: status %d dropped for a retry, request %s", p->b->name, p->status,
               gw_conn_req(p->c)->request_id);
    if (p->u) {
        p->u->broken = code != GW_FAIL_NONE;
        gw_upstream_release(p->u, false);
        p->u = NULL;
    }
    p->retry_status = false;
    p->status = 0;
    p->hlen = p->nhdrs = 0;
    p->in_field = p->in_value = false;
    gw_m_add(&gw_conn_worker(p->c)->m->backends[p->b->mid].retries, 1);
    if (p->rtimer == NULL)
        p->rtimer = evtimer_new(gw_conn_worker(p->c)->base, proxy_retry_cb, p);
    struct timeval tv = { p->retry_ms / 1000, (p->retry_ms % 1000) * 1000 };
    evtimer_add(p->rtimer, &tv);
    return true;
}

void
gw_proxy_start(gw_conn_t *c, const gw_route_t *route)
{
    gw_worker_t *w = gw_conn_worker(c);
    gw_proxy_t *p = w->proxy_cache;
    if (p) {
        w->proxy_cache = p->next_free;
        w->nproxy_cache--;
        p->next_free = NULL;
    } else {
        p = gw_calloc(1, sizeof(gw_proxy_t));
        p->timer = evtimer_new(w->base, proxy_timeout_cb, p);
    }
    p->c = c;
    p->route = route;
    p->b = route->proxy.backend;
    p->has_body = gw_conn_req(c)->has_body;
    if (p->has_body)
        p->replay = evbuffer_new();
    build_request(p);
    p->start_us = gw_now_us();
    if (gw_breaker_admit(p->b, NULL) != GW_OK) {
        proxy_refuse(p, GW_FAIL_CIRCUIT_OPEN, "its circuit breaker is open");
        return;
    }
    p->admitted = p->b->breaker != NULL;
    int rc = send_attempt(p, false);
    if (rc == GW_AGAIN && p->b->max_pending > 0) {
        /* max_connections in use: wait for one (proxy_wait_cb); the body waits in the client's socket */
        if (gw_upstream_wait(w, p->b, &p->wait, proxy_wait_cb, p) != GW_OK) {
            proxy_refuse(p, GW_FAIL_QUEUE_FULL, "its queue is full (max_pending)");
            return;
        }
        gw_conn_body_pause(c, true);
        rc = GW_OK;
    }
    if (rc != GW_OK) {
        int err = errno;
        char extra[256];
        snprintf(extra, sizeof(extra), ",\"backend\":\"%s\"", p->b->name);
        gw_log_rl(GW_LOG_ERR, "backend %s (%s): %s%s%s, client %s, request %s", p->b->name, p->b->host_header,
               rc == GW_AGAIN ? "max_connections reached" : "cannot connect", rc == GW_AGAIN ? "" : ": ",
               rc == GW_AGAIN ? "" : strerror(err), gw_conn_peer_ip(c), gw_conn_req(c)->request_id);
        gw_fail_t code = rc == GW_AGAIN ? GW_FAIL_UNAVAILABLE : GW_FAIL_CONNECT_FAILED;
        proxy_ended(p, code);
        proxy_free(p, false);
        gw_conn_error(c, gw_fail_status(code), gw_fail_proxy_name(code), extra);
        return;
    }
    evtimer_add(p->timer, gw_upstream_pool(w, p->b)->call_timeout);
    proxy_retry_begin(p);
    gw_conn_begin_async(c, &proxy_ops, p);
}
