/*
 * gw_proxy.c - proxy routes (see gw_proxy.h).
 *
 * Life of a proxied request: it starts as soon as the request head is
 * read. The upstream request head is built once (kept for retries) and
 * handed to an upstream exchange (gw_exchange.h), which takes a pooled or
 * new connection, tries again when that is safe, and reads the response
 * through gw_resp. The request body follows the head as it arrives from
 * the client (with its Content-Length, or re-chunked when the client sent
 * it chunked). The response head is filtered and written to the client,
 * its body is streamed as it arrives.
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
 * body never looks whole. A request can be sent again (a stale pooled
 * connection, a retry) while the body bytes sent so far are still at hand:
 * a body is kept for that up to REPLAY_MAX bytes.
 *
 * Ownership: the proxy context belongs to the client connection's async
 * slot and embeds its exchange. It is freed by proxy_free() on every end:
 * finish, error, abort, or cancel from the connection. Exchange callbacks
 * end the request at most once; the exchange then ends its entry point
 * with gw_conn_release(c) (proxy_xchg_settle) and touches nothing else.
 */
#include "gw_proxy.h"
#include "gw_breaker.h"
#include "gw_budget.h"
#include "gw_cluster.h"
#include "gw_config.h"
#include "gw_conn.h"
#include "gw_exchange.h"
#include "gw_fail.h"
#include "gw_http.h"
#include "gw_log.h"
#include "gw_resp.h"
#include "gw_router.h"
#include "gw_server.h"
#include "gw_template.h"

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
    gw_xchg_t ex;         /* the upstream exchange (gw_exchange.h): connection, tries, retries */
    char *head;           /* the upstream request head, kept for a retry */
    size_t head_len, head_cap;
    size_t host_off;      /* where each try's server writes its Host value (gw_xchg_t.host_off); 0: none */
    char *hout;           /* the filtered response head */
    size_t hout_cap;
    gw_proxy_t *next_free; /* in the worker's cache */
    struct evbuffer *replay; /* the framed body sent so far, while it fits REPLAY_MAX */
    size_t replay_held;   /* its bytes, taken from gw_budget_bodies */
    bool has_body;        /* the client's request has a body */
    bool body_sent;       /* all of it went upstream (the chunked end included) */
    bool body_paused;     /* the client's body waits for the upstream output to drain */
    bool head_sent;       /* the response head went to the client */
    bool retry_status;    /* the response head has a retried status: not passed on */
    /* the response head, collected as llhttp hands it over */
    char *hbuf;
    size_t hlen, hcap;
    gw_header_t *hdrs;
    size_t nhdrs, hdrs_cap;
    bool in_field, in_value;
};

static const gw_resp_ops_t resp_ops;
static const gw_xchg_ops_t xchg_ops;

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
    p->host_off = 0;
    if (p->route->proxy.preserve_host && host)
        ADD(host, host_len);
    else
        p->host_off = len; /* the server's, written by the exchange for each try */
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

/* Proxy contexts kept per worker for the next request, with their timers
 * and buffers: a request then allocates nothing of its own. */
#define CACHE_MAX 256

static void
proxy_destroy(gw_proxy_t *p)
{
    gw_xchg_destroy(&p->ex);
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
    gw_xchg_close(&p->ex, reusable);
    replay_drop(p);
    if (w->nproxy_cache >= CACHE_MAX || w->stopping) {
        proxy_destroy(p);
        return;
    }
    /* keep the allocations, reset the rest */
    gw_xchg_t ex = p->ex; /* closed: only its timers are left, kept */
    char *head = p->head, *hout = p->hout, *hbuf = p->hbuf;
    size_t head_cap = p->head_cap, hout_cap = p->hout_cap, hcap = p->hcap, hdrs_cap = p->hdrs_cap;
    gw_header_t *hdrs = p->hdrs;
    memset(p, 0, sizeof(*p));
    p->ex = ex;
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
    if (p->ex.u)
        gw_upstream_read(p->ex.u, true);
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
    if (p->ex.u == NULL || p->body_sent)
        return;
    struct evbuffer *out = gw_upstream_output(p->ex.u);
    gw_req_t *r = gw_conn_req(p->c);
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
    gw_upstream_send(p->ex.u);
    if (!p->body_sent && evbuffer_get_length(out) > UP_HIGH && !p->body_paused) {
        p->body_paused = true;
        gw_conn_body_pause(p->c, true); /* proxy_xchg_drained resumes it */
    }
}

static void
proxy_body(void *ctx)
{
    forward_body(ctx);
}

static const gw_conn_async_t proxy_ops = { proxy_cancel, proxy_drained, proxy_body };

/*
 * Ends the request with code's error answer (its status: gw_fail_status,
 * with Retry-After when the code has one), or closes the client connection
 * when part of the response reached it already. Logged with doing, unless
 * that is NULL (the exchange logged it).
 */
static void
proxy_error(gw_proxy_t *p, gw_fail_t code, const char *doing, int err)
{
    gw_conn_t *c = p->c;
    if (doing)
        /* an open circuit was logged once when it opened */
        gw_log_rl(code == GW_FAIL_CIRCUIT_OPEN                                 ? GW_LOG_INFO
                  : code == GW_FAIL_QUEUE_FULL || code == GW_FAIL_QUEUE_TIMEOUT ? GW_LOG_WARN
                                                                                : GW_LOG_ERR,
                  "backend %s%s%s: %s%s%s while %s, client %s, request %s", p->b->name, p->ex.sent ? " server " : "",
                  p->ex.sent ? gw_xchg_server(&p->ex) : "", gw_fail_proxy_name(code), err ? ": " : "",
                  err ? strerror(err) : "", doing, gw_conn_peer_ip(c), gw_conn_req(c)->request_id);
    gw_xchg_ended(&p->ex, code);
    if (p->head_sent && !gw_conn_take_back(c)) {
        /* part of the response reached the client: only closing is left */
        proxy_free(p, false);
        gw_conn_abort(c);
        return;
    }
    char extra[256], hdr[40] = "";
    int retry_s = gw_fail_retry_after(code);
    if (retry_s < 0)
        retry_s = gw_breaker_retry_after_s(p->b);
    if (retry_s > 0)
        snprintf(hdr, sizeof(hdr), "Retry-After: %d\r\n", retry_s);
    snprintf(extra, sizeof(extra), ",\"backend\":\"%s\"", p->b->name);
    proxy_free(p, false);
    gw_conn_error_headers(c, gw_fail_status(code), gw_fail_proxy_name(code), extra, hdr);
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

/*
 * Retries (the backend's "retry" section, decided by gw_exchange): a
 * proxied request is sent again when nothing of the response has reached
 * the client yet and the request can be replayed (no body, or the body
 * sent so far is still at hand: up to REPLAY_MAX bytes). Retried: connect
 * failures and connect timeouts, a reset or EOF before the response head,
 * and a listed status when the request's body was sent whole (the
 * response is then dropped, its connection closed). A request whose body
 * is still streaming from the client is never retried on a status: the
 * backend may have acted on part of it. Proxies stream the response, so
 * there is no per-try timeout.
 */
static int
on_resp_headers_complete(gw_resp_t *r)
{
    gw_proxy_t *p = PROXY(r);
    p->ex.status = r->status;
    if (gw_xchg_retry_decide(&p->ex, GW_FAIL_BAD_STATUS, 0, !p->has_body || (p->body_sent && p->replay))) {
        p->retry_status = true; /* nothing was sent to the client: proxy_xchg_fail() retries */
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
    gw_conn_start_response(p->c, p->ex.status, out ? out : "", len, p->ex.status == 204 ? -1 : r->content_length);
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

/* --- the exchange's callbacks ---------------------------------------------- */

#define PX(x) ((gw_proxy_t *)(x)->arg)

/* A try has its connection: the head is queued; the body follows (first
 * what an earlier try sent, kept for this), then what the client sends. */
static void
proxy_xchg_begin(gw_xchg_t *x, struct evbuffer *out)
{
    gw_proxy_t *p = PX(x);
    p->retry_status = false;
    p->hlen = p->nhdrs = 0;
    p->in_field = p->in_value = false;
    if (p->replay) /* a retry: first what the failed attempt sent */
        evbuffer_add(out, evbuffer_pullup(p->replay, -1), evbuffer_get_length(p->replay));
    forward_body(p);
}

/* The response is complete: pool the connection when it can serve another
 * request, and end the client's response. */
static void
proxy_xchg_done(gw_xchg_t *x, bool reusable)
{
    gw_proxy_t *p = PX(x);
    gw_conn_t *c = p->c;
    /* A response that came before the whole request body was sent leaves
     * the connection mid-request: never reused. */
    reusable = reusable && (p->body_sent || !p->has_body);
    gw_fail_t code = p->ex.status >= 500 ? GW_FAIL_BAD_STATUS : GW_FAIL_NONE;
    gw_xchg_outcome(&p->ex, code, p->ex.status);
    gw_xchg_ended(&p->ex, code);
    proxy_free(p, reusable);
    gw_conn_end_response(c);
}

/* Sent again only while nothing of the response reached the client and
 * the body sent so far is at hand. */
static bool
proxy_replayable(gw_xchg_t *x)
{
    gw_proxy_t *p = PX(x);
    return !p->head_sent && (!p->has_body || p->replay != NULL);
}

/* The try failed: retried when that is safe (see above), else the request
 * ends with the error. */
static void
proxy_xchg_fail(gw_xchg_t *x, gw_xchg_cause_t cause, gw_fail_t code, const char *doing, int err)
{
    gw_proxy_t *p = PX(x);
    if (cause == GW_XCHG_INVALID && p->retry_status) { /* decided in on_resp_headers_complete */
        gw_log_rl(GW_LOG_INFO, "backend %s: status %d dropped for a retry, request %s", p->b->name, x->status,
                  gw_conn_req(p->c)->request_id);
        gw_xchg_retry_go(x, false);
        return;
    }
    if (gw_xchg_end_try(x, code, false) == NULL)
        return; /* sent again after a sleep */
    bool logged = cause == GW_XCHG_CONNECT || cause == GW_XCHG_BROKE ||
                  (cause == GW_XCHG_INVALID && x->rd.error == GW_RESP_BAD);
    proxy_error(p, code, logged ? NULL : doing, err);
}

/* The upstream output fell to UP_LOW (or the connect wrote what the body
 * had queued): take more of the client's body. */
static void
proxy_xchg_drained(gw_xchg_t *x)
{
    gw_proxy_t *p = PX(x);
    if (p->body_paused && x->u && evbuffer_get_length(gw_upstream_output(x->u)) <= UP_LOW) {
        p->body_paused = false;
        gw_conn_body_pause(p->c, false);
    }
}

/* Answer bytes went to the client's output: false (stop reading) when the
 * client falls behind; proxy_drained() resumes. */
static bool
proxy_xchg_flush(gw_xchg_t *x)
{
    gw_proxy_t *p = PX(x);
    return !p->head_sent || gw_conn_send(p->c);
}

/* While the request waits for a connection, its body waits in the
 * client's socket. */
static void
proxy_xchg_queued(gw_xchg_t *x, bool on)
{
    gw_proxy_t *p = PX(x);
    if (on || !p->body_paused)
        gw_conn_body_pause(p->c, on);
}

static void
proxy_xchg_settle(void *sarg)
{
    gw_conn_release(sarg);
}

static const gw_xchg_ops_t xchg_ops = {
    .resp = &resp_ops,
    .begin = proxy_xchg_begin,
    .done = proxy_xchg_done,
    .fail = proxy_xchg_fail,
    .drained = proxy_xchg_drained,
    .flush = proxy_xchg_flush,
    .queued = proxy_xchg_queued,
    .replayable = proxy_replayable,
    .settle = proxy_xchg_settle,
};

/* The hash of b's hash_key for this request (hash balance), into x. */
static void
proxy_hash(gw_proxy_t *p, const gw_match_t *m, gw_xchg_t *x)
{
    if (p->b->hash_key == NULL)
        return;
    gw_tpl_ctx_t ctx = { .req = gw_conn_req(p->c), .match = m };
    gw_tpl_buf_t key = { 0 };
    gw_tpl_err_t err;
    if (gw_tpl_render(p->b->hash_key, &ctx, &key, &err) == GW_OK) {
        x->hash = gw_cluster_hash(key.data, key.len);
        x->has_hash = true;
    } /* else no key (a header absent): balanced by round robin */
    gw_tpl_buf_free(&key);
}

void
gw_proxy_start(gw_conn_t *c, const gw_match_t *m)
{
    const gw_route_t *route = m->route;
    gw_worker_t *w = gw_conn_worker(c);
    gw_proxy_t *p = w->proxy_cache;
    if (p) {
        w->proxy_cache = p->next_free;
        w->nproxy_cache--;
        p->next_free = NULL;
    } else {
        p = gw_calloc(1, sizeof(gw_proxy_t));
    }
    p->c = c;
    p->route = route;
    p->b = route->proxy.backend;
    p->has_body = gw_conn_req(c)->has_body;
    if (p->has_body)
        p->replay = evbuffer_new();
    build_request(p);
    gw_req_t *r = gw_conn_req(c);
    gw_xchg_t *x = &p->ex;
    gw_xchg_init(x, &xchg_ops, p, c, w, p->b, NULL, r->request_id, gw_conn_peer_ip(c));
    x->head = p->head;
    x->head_len = p->head_len;
    x->host_off = p->host_off;
    proxy_hash(p, m, x);
    x->method = r->method;
    x->max_body = INT64_MAX;
    x->timeout_ms = p->b->timeout_ms;
    x->low_water = UP_LOW;
    gw_fail_t code = gw_xchg_start(x);
    if (code != GW_FAIL_NONE) {
        proxy_error(p, code,
                    code == GW_FAIL_CIRCUIT_OPEN  ? "asking its circuit breaker (open)"
                    : code == GW_FAIL_QUEUE_FULL  ? "queueing for a connection (max_pending reached)"
                    : code == GW_FAIL_UNAVAILABLE ? "starting (max_connections reached)"
                    : code == GW_FAIL_NO_HEALTHY_SERVER ? "choosing a server (none of the backend's is usable)"
                                                  : "connecting to upstream",
                    code == GW_FAIL_CONNECT_FAILED ? errno : 0);
        return;
    }
    gw_conn_begin_async(c, &proxy_ops, p);
}
