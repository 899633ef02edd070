/*
 * gw_conn.c - client connections (see gw_conn.h).
 *
 * States:
 *   READING   parsing the next request (timers: header, body, keep-alive)
 *   HANDLING  a whole request is being answered; pipelined bytes wait
 *   FLUSHING  the last response is being written, then the write side is
 *             shut down
 *   LINGERING reading and discarding what the client still sends, so the
 *             kernel does not answer it with a reset that destroys the
 *             response in flight (nginx's lingering close)
 *
 * Freeing: gw_conn_close() only marks the connection; gw_conn_release() at
 * the end of every entry point (event callbacks, the worker's stop) frees it
 * once nothing up the stack uses it.
 *
 * Idle connections (READING, no request begun, nothing to send) are also
 * on their worker's idle list, oldest first, so that at max_connections
 * the oldest can be closed for a new client (gw_conn_drain_idle).
 *
 * A client that shuts down its write side after a complete request is
 * answered, then the connection closes. EOF alone cannot tell that client
 * from one that closed its socket and went away, whose request should be
 * cancelled: gatherd sends an HTTP/1.1 client an interim "100 Continue"
 * (which RFC 9110 15.2 requires clients to accept at any time) and watches
 * the socket; a closed socket answers the bytes with a reset.
 *
 * I/O is done the way nginx does it, not with bufferevents: the read event
 * stays registered (EV_PERSIST) while reading is wanted; responses are
 * written to the socket right after the input at hand is handled (so
 * pipelined answers leave in one writev), and a write event is armed only
 * when the socket would block. That is one recv and one writev per request
 * and no epoll_ctl, where a bufferevent toggles its write event twice.
 */
#include "gw_conn.h"
#include "gw_agg.h"
#include "gw_alog.h"
#include "gw_config.h"
#include "gw_http.h"
#include "gw_inflight.h"
#include "gw_log.h"
#include "gw_proxy.h"
#include "gw_ratelimit.h"
#include "gw_realip.h"
#include "gw_router.h"
#include "gw_server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Stop taking pipelined requests while this much output is unsent. */
#define OUT_HIGH (256 * 1024)
/* Bytes written to one client per turn of the loop: a large answer leaves
 * in several turns instead of stalling the others (copying megabytes into
 * a loopback socket takes milliseconds). */
#define FLUSH_MAX (128 * 1024)
/* Stop reading from the client while this much input is unparsed. */
#define IN_HIGH (64 * 1024)
/* Bytes asked of one recv(). */
#define READ_CHUNK 16384
/* Bodies up to this size are copied into the output; larger ones are
 * referenced (the configuration that owns them outlives the connection). */
#define COPY_BODY_MAX 4096

typedef enum { C_READING, C_HANDLING, C_FLUSHING, C_LINGERING } conn_state_t;

struct gw_conn_s {
    gw_worker_t *w;
    gw_conn_t *prev, *next;
    evutil_socket_t fd;
    struct event *rev;   /* EV_READ | EV_PERSIST */
    struct event *wev;   /* EV_WRITE | EV_PERSIST, armed only while output is blocked */
    struct event *timer;
    struct evbuffer *in;
    struct evbuffer *out;
    gw_timer_t timer_kind;
    conn_state_t state;
    gw_gen_t *gen;    /* one reference: the configuration requests start on */
    gw_config_t *cfg; /* gen->cfg */
    gw_parser_t parser;
    gw_req_t req;
    unsigned requests;
    bool reading;     /* rev is registered */
    bool writing;     /* wev is registered */
    bool close_after; /* no further request on this connection */
    bool wait_write;  /* paused: too much output pending */
    bool peer_eof;
    bool processing;  /* conn_process is on the stack */
    bool dead;        /* marked for freeing */
    bool want_drained; /* the async handler waits for the output to drain */
    bool chunked_out;  /* the response body is sent chunked */
    bool no_body;      /* HEAD, 204, 304: body bytes are dropped */
    bool resp_started; /* the response head was queued */
    uint64_t out_sent; /* bytes written to the socket so far */
    uint64_t resp_at;  /* out_sent + queued bytes when the response head was queued: where it starts */
    bool body_stream;  /* the request body is being read and handed to the async handler */
    bool body_paused;  /* ... but the handler asked to wait */
    const gw_conn_async_t *async; /* set while an async handler owns the request */
    void *async_ctx;
    char peer[64];
    char peer_ip[64];
    bool inflight;     /* the request holds a gw_inflight unit */
    bool idle;         /* on the worker's idle list */
    bool probed;       /* the half-close probe (100 Continue) was sent */
    uint8_t gone_polls; /* looks at the socket since the probe (gone_timer) */
    bool watching;     /* the request in flight watches for the client's reset */
    gw_conn_t *idle_prev, *idle_next;
    uint64_t idle_since_us; /* when its last request ended (or it was accepted): its place on the idle list */
    size_t rl_hdr_len; /* RateLimit-* lines for the response of this request */
    char rl_hdr[GW_RATELIMIT_HDR_MAX];
    gw_alog_rec_t alog; /* the access log line of the current request */
    unsigned mroute;    /* the current request's route slot in the metrics (gw_metrics.h) */
};

static void conn_run(gw_conn_t *c);
static void reject(gw_conn_t *c, int status, const char *reason);

gw_alog_rec_t *
gw_conn_alog(gw_conn_t *c)
{
    return &c->alog;
}

gw_conn_t *
gw_conn_next(gw_conn_t *c)
{
    return c->next;
}

static void
idle_unlink(gw_conn_t *c)
{
    gw_worker_t *w = c->w;
    if (!c->idle)
        return;
    if (c->idle_prev)
        c->idle_prev->idle_next = c->idle_next;
    else
        w->idle_first = c->idle_next;
    if (c->idle_next)
        c->idle_next->idle_prev = c->idle_prev;
    else
        w->idle_last = c->idle_prev;
    c->idle_prev = c->idle_next = NULL;
    c->idle = false;
    __atomic_store_n(&w->idle_oldest_us, w->idle_first ? w->idle_first->idle_since_us : 0, __ATOMIC_RELAXED);
}

/* Puts c on its worker's idle list when it is idle, in the order of
 * idle_since_us (almost always at the end), takes it off when it is not. */
static void
idle_update(gw_conn_t *c)
{
    gw_worker_t *w = c->w;
    bool idle = !c->dead && c->state == C_READING && !c->parser.started && evbuffer_get_length(c->in) == 0 &&
                evbuffer_get_length(c->out) == 0;
    if (idle == c->idle)
        return;
    if (!idle) {
        idle_unlink(c);
        return;
    }
    c->idle = true;
    gw_conn_t *after = w->idle_last;
    while (after && after->idle_since_us > c->idle_since_us)
        after = after->idle_prev;
    c->idle_prev = after;
    c->idle_next = after ? after->idle_next : w->idle_first;
    if (c->idle_next)
        c->idle_next->idle_prev = c;
    else
        w->idle_last = c;
    if (after)
        after->idle_next = c;
    else
        w->idle_first = c;
    __atomic_store_n(&w->idle_oldest_us, w->idle_first->idle_since_us, __ATOMIC_RELAXED);
}

bool
gw_conn_drain_idle(gw_worker_t *w)
{
    gw_conn_t *c = w->idle_first;
    if (c == NULL)
        return false;
    gw_log(GW_LOG_DEBUG, "client %s: idle connection closed for a new one (max_connections)", c->peer);
    gw_conn_close(c);
    gw_conn_release(c);
    return true;
}

/* The current request ended: its metrics, and its access log line (when
 * the log is on). A request refused before its head was complete has no method, target or
 * trustworthy headers yet: the line says "-" and names the peer. */
static void
note_request(gw_conn_t *c)
{
    if (c->alog.start_us) {
        gw_m_request(c->w->m, c->mroute, c->alog.status, gw_now_us() - c->alog.start_us);
        gw_m_gauge(&c->w->m->inflight, -1);
    }
    c->mroute = GW_M_ROUTE_UNMATCHED;
    if (!c->cfg->log.access_on)
        return;
    c->alog.no_head = !c->parser.headers_done;
    gw_alog_request(c->cfg, &c->req, c->alog.no_head ? c->peer_ip : gw_conn_client_ip(c), &c->alog);
}

static void
conn_free(gw_conn_t *c)
{
    gw_worker_t *w = c->w;
    if (c->state == C_HANDLING) /* died mid-request: still one line */
        note_request(c);
    else if (c->alog.start_us) /* a request not read whole: not counted, but no longer in flight */
        gw_m_gauge(&w->m->inflight, -1);
    if (c->async) {
        const gw_conn_async_t *ops = c->async;
        c->async = NULL;
        ops->cancel(c->async_ctx);
    }
    if (c->inflight)
        gw_inflight_release();
    idle_unlink(c);
    if (c->prev)
        c->prev->next = c->next;
    else
        w->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    event_free(c->rev);
    event_free(c->wev);
    event_free(c->timer);
    evbuffer_free(c->in);
    evbuffer_free(c->out);
    close(c->fd);
    gw_parser_free(&c->parser);
    gw_server_gen_unref(w, c->gen);
    free(c);
    gw_server_conn_closed(w);
}

static void
read_enable(gw_conn_t *c, bool on)
{
    if (on == c->reading)
        return;
    c->reading = on;
    if (on)
        event_add(c->rev, NULL);
    else
        event_del(c->rev);
}

void
gw_conn_close(gw_conn_t *c)
{
    c->dead = true;
    idle_unlink(c);
    read_enable(c, false);
    event_del(c->wev);
    event_del(c->timer);
}

void
gw_conn_release(gw_conn_t *c)
{
    if (c->dead)
        conn_free(c);
}

static void
timer_set(gw_conn_t *c, gw_timer_t kind)
{
    if (kind == c->timer_kind && kind != GW_T_NONE && kind != GW_T_BODY)
        return; /* already running: a header deadline is not extended */
    c->timer_kind = kind;
    if (kind == GW_T_NONE)
        event_del(c->timer);
    else
        event_add(c->timer, c->w->timeouts[kind]);
}

static char *
put(char *p, const char *s, size_t len)
{
    memcpy(p, s, len);
    return p + len;
}

#define PUT_LIT(p, lit) put(p, lit, sizeof(lit) - 1)

static char *
put_uint(char *p, size_t v)
{
    char tmp[24];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

static void
body_sent(const void *data, size_t len, void *cfg)
{
    GW_UNUSED(data);
    GW_UNUSED(len);
    gw_config_unref(cfg);
}

/*
 * Appends a whole response to the output: the status line and the headers
 * every response has, extra (header lines, borrowed), then body unless
 * send_body is false. Small responses are assembled in one stack buffer so
 * they cost one evbuffer_add and leave in a single iovec; the head is built
 * by hand because this runs once per request and snprintf showed in
 * profiles.
 */
static void
write_response(gw_conn_t *c, int status, const char *extra, size_t extra_len, const char *body, int64_t length,
               bool send_body)
{
    char buf[2048];
    char genid[33];
    size_t clen = length < 0 ? 0 : (size_t)length;
    const char *id = c->req.request_id;
    if (id[0] == '\0') {
        gw_http_new_request_id(genid);
        id = genid;
    }
    c->alog.status = status;
    const char *text = gw_http_status_text(status);
    size_t idlen = strlen(id), textlen = strlen(text); /* id: at most 63 bytes, see gw_http.c */
    /* fixed text of the head, two numbers, the id and the status text */
    size_t head_max = 160 + idlen + textlen + c->rl_hdr_len;
    bool small = head_max + extra_len + (send_body ? clen : 0) <= sizeof(buf);
    char *p = PUT_LIT(buf, "HTTP/1.1 ");
    p = put_uint(p, (size_t)status);
    *p++ = ' ';
    p = put(p, text, textlen);
    p = PUT_LIT(p, "\r\nDate: ");
    p = put(p, gw_http_date(), 29);
    p = PUT_LIT(p, "\r\nServer: gatherd\r\nX-Request-Id: ");
    p = put(p, id, idlen);
    p = PUT_LIT(p, "\r\n");
    if (small) {
        p = put(p, extra, extra_len);
    } else {
        evbuffer_add(c->out, buf, (size_t)(p - buf));
        evbuffer_add(c->out, extra, extra_len);
        p = buf;
    }
    p = put(p, c->rl_hdr, c->rl_hdr_len);
    if (length < 0) {
        if (c->chunked_out)
            p = PUT_LIT(p, "Transfer-Encoding: chunked\r\n");
    } else if (status != 204) {
        p = PUT_LIT(p, "Content-Length: ");
        p = put_uint(p, clen);
        p = PUT_LIT(p, "\r\n");
    }
    if (c->close_after)
        p = PUT_LIT(p, "Connection: close\r\n");
    else if (c->req.http_minor == 0)
        p = PUT_LIT(p, "Connection: keep-alive\r\n");
    p = PUT_LIT(p, "\r\n");
    if (small && send_body)
        p = put(p, body, clen);
    evbuffer_add(c->out, buf, (size_t)(p - buf));
    if (!small && send_body && clen) {
        if (clen <= COPY_BODY_MAX)
            evbuffer_add(c->out, body, clen);
        else /* the configuration that owns it lives until it is sent */
            evbuffer_add_reference(c->out, body, clen, body_sent, gw_config_ref(c->cfg));
    }
}

/* After a response: close, or get ready for the next request. */
static void
request_done(gw_conn_t *c)
{
    note_request(c);
    gw_alog_rec_reset(&c->alog);
    gw_parser_body_release(&c->parser); /* the memory and its budget go back now, not at the close */
    c->watching = false;
    c->idle_since_us = gw_now_us(); /* before the answer leaves: the client cannot act on it earlier */
    c->requests++;
    if (c->inflight) {
        c->inflight = false;
        gw_inflight_release();
    }
    c->rl_hdr_len = 0;
    c->resp_started = false;
    c->body_stream = c->body_paused = false;
    if (c->close_after) {
        c->state = C_FLUSHING;
        read_enable(c, false);
        timer_set(c, GW_T_NONE);
    } else {
        gw_parser_next(&c->parser);
        c->state = C_READING;
        timer_set(c, evbuffer_get_length(c->in) ? GW_T_HEADER : c->w->stopping ? GW_T_DRAIN : GW_T_KEEPALIVE);
        if (!c->peer_eof)
            read_enable(c, evbuffer_get_length(c->in) < IN_HIGH);
    }
    if (!c->processing)
        conn_run(c); /* an answer that came later than its request */
}

/* Whether this response is the connection's last. */
static void
decide_close(gw_conn_t *c)
{
    /* peer_eof: requests the client sent before its EOF are still
     * answered; body_stream: the rest of the body is unread */
    if (c->requests + 1 >= c->cfg->http.max_keepalive_requests || c->w->stopping || !c->req.keep_alive ||
        (c->peer_eof && evbuffer_get_length(c->in) == 0) || c->body_stream)
        c->close_after = true;
}

/*
 * Sends a whole response. headers: extra header lines ("Name: v\r\n"...),
 * borrowed. body: borrowed; must live as long as c->cfg when larger than
 * COPY_BODY_MAX. No body is sent for HEAD, 204 and 304.
 */
static void
respond(gw_conn_t *c, int status, const char *headers, size_t headers_len, const char *body, size_t body_len)
{
    decide_close(c);
    bool send_body = body_len && c->req.method != HTTP_HEAD && status != 204 && status != 304;
    c->chunked_out = false;
    write_response(c, status, headers, headers_len, body, (int64_t)body_len, send_body);
    c->alog.bytes = send_body ? body_len : 0;
    request_done(c);
}

/* Copies s into out as the inside of a JSON string; returns bytes written. */
static size_t
json_escape(char *out, size_t cap, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    size_t w = 0;
    for (; *s && w + 7 < cap; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') {
            out[w++] = '\\';
            out[w++] = (char)ch;
        } else if (ch < 0x20) {
            memcpy(out + w, "\\u00", 4);
            out[w + 4] = hex[ch >> 4];
            out[w + 5] = hex[ch & 15];
            w += 6;
        } else {
            out[w++] = (char)ch;
        }
    }
    out[w] = '\0';
    return w;
}

/* A JSON error answer: {"error": {"code", "message"?, <extra members>, "request_id"}}. */
static void
respond_error_json(gw_conn_t *c, int status, const char *code, const char *message, const char *members,
                   const char *extra_headers)
{
    if (c->req.request_id[0] == '\0')
        gw_http_new_request_id(c->req.request_id); /* the same id in the header and the body */
    char msg[256] = "";
    if (message) {
        size_t n = (size_t)snprintf(msg, sizeof(msg), ",\"message\":\"");
        n += json_escape(msg + n, sizeof(msg) - n - 2, message);
        snprintf(msg + n, sizeof(msg) - n, "\"");
    }
    char body[1024];
    int n = snprintf(body, sizeof(body), "{\"error\":{\"code\":\"%s\"%s%s,\"request_id\":\"%s\"}}", code, msg,
                     members ? members : "", c->req.request_id);
    const char *eh = extra_headers ? extra_headers : "";
    size_t cap = 40 + strlen(eh); /* Server-Timing of an aggregate route can be a few KiB */
    char small[512];
    char *hdrs = cap <= sizeof(small) ? small : gw_malloc(cap);
    int h = snprintf(hdrs, cap, "Content-Type: application/json\r\n%s", eh);
    respond(c, status, hdrs, (size_t)h, body, (size_t)GW_MIN((size_t)n, sizeof(body) - 1)); /* copies both */
    if (hdrs != small)
        free(hdrs);
}

static void
respond_error(gw_conn_t *c, int status, const char *code, const char *message, const char *extra)
{
    respond_error_json(c, status, code, message, NULL, extra);
}

/* Answers a request the parser rejected, then closes. */
static void
reject(gw_conn_t *c, int status, const char *reason)
{
    static const struct {
        int status;
        const char *code;
    } codes[] = { { 400, "bad_request" },       { 405, "method_not_allowed" }, { 408, "request_timeout" },
                  { 413, "body_too_large" },    { 414, "uri_too_long" },       { 417, "expectation_failed" },
                  { 431, "headers_too_large" }, { 501, "not_implemented" }, { 503, "body_budget_exhausted" },
                  { 505, "version_not_supported" } };
    const char *code = "bad_request";
    for (size_t i = 0; i < GW_NELEM(codes); i++)
        if (codes[i].status == status)
            code = codes[i].code;
    gw_log_rl(status == 408 ? GW_LOG_INFO : GW_LOG_NOTICE, "client %s: %d %s while reading request%s%s", c->peer,
           status, reason, c->req.request_id[0] ? ", request " : "", c->req.request_id);
    c->close_after = true;
    c->req.keep_alive = false;
    c->state = C_HANDLING;
    /* 503: the memory budget of request bodies is spent, for now */
    respond_error(c, status, code, reason, status == 503 ? "Retry-After: 1\r\n" : NULL);
}

/*
 * Admission of a routed request, before any backend is contacted:
 * max_inflight (503 overloaded), then the route's rate limit (429
 * rate_limited). False when it was answered. body_unread: the request's
 * body is still in the socket (a streamed proxy body), so a refusal closes
 * the connection after it.
 */
static bool
admit(gw_conn_t *c, const gw_route_t *route, bool body_unread)
{
    char hdr[48];
    if (c->cfg->max_inflight && !c->inflight) {
        if (!gw_inflight_acquire(c->cfg->max_inflight)) {
            gw_m_add(&c->w->m->shed, 1);
            c->close_after = c->close_after || body_unread;
            respond_error(c, 503, "overloaded", "too many requests in flight", "Retry-After: 1\r\n");
            return false;
        }
        c->inflight = true;
    }
    if (route->ratelimit) {
        unsigned retry = gw_ratelimit_admit(route->ratelimit, c->cfg, &c->req, c->peer_ip, c->rl_hdr, sizeof(c->rl_hdr),
                                            &c->rl_hdr_len);
        if (retry) {
            gw_m_add(&c->w->m->routes[route->mid].rate_limited, 1);
            snprintf(hdr, sizeof(hdr), "Retry-After: %u\r\n", retry);
            c->close_after = c->close_after || body_unread;
            respond_error(c, 429, "rate_limited", "rate limit exceeded", hdr);
            return false;
        }
    }
    return true;
}

static void
dispatch(gw_conn_t *c)
{
    gw_req_t *r = &c->req;
    gw_match_t m;
    switch (gw_router_match(c->cfg->router, r->method, &r->path, &m)) {
    case GW_ROUTE_FOUND:
        break;
    case GW_ROUTE_BAD_METHOD: {
        char allow[256], hdr[300];
        gw_router_format_methods(m.allow, allow, sizeof(allow));
        snprintf(hdr, sizeof(hdr), "Allow: %s\r\n", allow);
        if (m.path_route) {
            c->alog.route = m.path_route->pattern;
            c->mroute = m.path_route->mid;
        }
        respond_error(c, 405, "method_not_allowed", "method not allowed for this path", hdr);
        return;
    }
    default:
        respond_error(c, 404, "not_found", "no route for this path", NULL);
        return;
    }
    const gw_route_t *route = m.route;
    c->alog.route = route->pattern;
    c->mroute = route->mid;
    if (!admit(c, route, false))
        return;
    switch (route->kind) {
    case GW_ROUTE_RESPOND:
        respond(c, route->respond.status, route->respond.head, route->respond.head_len, route->respond.body,
                route->respond.body_len);
        return;
    case GW_ROUTE_PROXY:
        c->alog.up_start_us = gw_now_us();
        gw_proxy_start(c, &m);
        return;
    case GW_ROUTE_AGGREGATE:
        gw_agg_start(c, &m);
        return;
    }
    respond_error(c, 500, "internal", "route kind not handled", NULL);
}

/*
 * The head of a request with a body was read. A proxy route gets the
 * request now and the body streams to it (with the route's body limit);
 * every other route gets it once the body is in (http.max_body_bytes):
 * kept in memory, against memory.request_body_bytes, only for an
 * aggregate route with a call that forwards it; read and dropped for the
 * others (fixed answers, aggregates that do not use it, 404, 405).
 */
static void
head_received(gw_conn_t *c)
{
    gw_req_t *r = &c->req;
    gw_match_t m;
    const gw_route_t *route = NULL, *found = NULL;
    if (gw_router_match(c->cfg->router, r->method, &r->path, &m) == GW_ROUTE_FOUND)
        found = m.route;
    if (found && found->kind == GW_ROUTE_PROXY)
        route = found;
    gw_parser_set_body_mode(&c->parser, route ? GW_BODY_STREAM
                                        : found && found->kind == GW_ROUTE_AGGREGATE && found->agg.uses_body
                                            ? GW_BODY_KEEP
                                            : GW_BODY_DISCARD);
    if (route) {
        c->alog.route = route->pattern;
        c->mroute = route->mid;
    }
    if (route && !admit(c, route, true))
        return;
    if (route)
        gw_parser_set_body_limit(&c->parser, route->proxy.max_body_bytes < 0 ? c->cfg->http.max_body_bytes
                                                                              : (size_t)route->proxy.max_body_bytes);
    if (gw_parser_resume(&c->parser) != GW_OK) {
        timer_set(c, GW_T_NONE);
        reject(c, c->parser.status, c->parser.reason);
        return;
    }
    if (r->expect_continue)
        evbuffer_add(c->out, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    timer_set(c, GW_T_BODY);
    if (route == NULL)
        return;
    c->state = C_HANDLING;
    c->body_stream = true;
    c->body_paused = false;
    c->alog.up_start_us = gw_now_us();
    gw_proxy_start(c, &m);
}

/* A streamed body cannot be read to its end (limit, bad framing, timeout):
 * the handler is cancelled and the client told, or, when its response has
 * begun, the connection is closed. */
static void
body_failed(gw_conn_t *c, int status, const char *reason)
{
    if (c->async) {
        const gw_conn_async_t *ops = c->async;
        c->async = NULL;
        ops->cancel(c->async_ctx);
    }
    c->body_stream = false;
    timer_set(c, GW_T_NONE);
    if (c->resp_started) {
        gw_log_rl(GW_LOG_INFO, "client %s: %d %s while streaming the request body, request %s; closing", c->peer,
               status, reason, c->req.request_id);
        gw_conn_close(c);
        return;
    }
    reject(c, status, reason);
}

/* Feeds the first piece of the input to the parser and drains what it
 * used. False when the input holds nothing to feed. */
static bool
parse_input(gw_conn_t *c, gw_parse_result_t *pr)
{
    struct evbuffer_iovec v;
    if (evbuffer_peek(c->in, -1, NULL, &v, 1) < 1)
        return false;
    size_t used = 0;
    *pr = gw_parser_execute(&c->parser, v.iov_base, v.iov_len, &used);
    evbuffer_drain(c->in, used);
    return true;
}

/* Parses the streamed body out of the input and hands it to the handler,
 * until the input is used up, the body ends or the handler pauses. */
static void
pump_body(gw_conn_t *c)
{
    while (c->body_stream && !c->body_paused && !c->dead && evbuffer_get_length(c->in) > 0) {
        gw_parse_result_t pr;
        if (!parse_input(c, &pr))
            break;
        if (pr == GW_PARSE_ERROR) {
            body_failed(c, c->parser.status, c->parser.reason);
            return;
        }
        if (pr == GW_PARSE_DONE) {
            c->body_stream = false;
            timer_set(c, GW_T_NONE);
        } else {
            timer_set(c, GW_T_BODY);
        }
        if (c->async && (evbuffer_get_length(c->req.body) > 0 || !c->body_stream))
            c->async->body(c->async_ctx);
    }
    if (c->body_stream && !c->body_paused && !c->dead && !c->peer_eof && !c->reading &&
        evbuffer_get_length(c->in) < IN_HIGH)
        read_enable(c, true);
}

/* Parses and answers what the input holds, in order, until it needs more
 * bytes, a response is pending, or too much output waits. */
static void
conn_process(gw_conn_t *c)
{
    if (c->processing)
        return; /* the loop further up the stack picks up the new state */
    c->processing = true;
    if (c->body_stream)
        pump_body(c);
    while (c->state == C_READING && !c->dead) {
        if (evbuffer_get_length(c->in) == 0)
            break;
        if (evbuffer_get_length(c->out) > OUT_HIGH) {
            c->wait_write = true; /* resumed once the output drains */
            break;
        }
        if (c->timer_kind == GW_T_KEEPALIVE || c->timer_kind == GW_T_DRAIN)
            timer_set(c, GW_T_HEADER);
        if (c->alog.start_us == 0) {
            c->alog.start_us = gw_now_us(); /* the first bytes of this request */
            gw_m_gauge(&c->w->m->inflight, 1);
        }
        gw_parse_result_t pr;
        if (!parse_input(c, &pr))
            break;
        switch (pr) {
        case GW_PARSE_AGAIN:
            if (c->parser.headers_done)
                timer_set(c, GW_T_BODY);
            break;
        case GW_PARSE_HEADERS:
            head_received(c);
            if (c->body_stream)
                pump_body(c); /* body bytes that came with the head */
            break;
        case GW_PARSE_DONE:
            timer_set(c, GW_T_NONE);
            c->state = C_HANDLING;
            dispatch(c);
            break;
        case GW_PARSE_ERROR:
            timer_set(c, GW_T_NONE);
            reject(c, c->parser.status, c->parser.reason);
            break;
        }
    }
    if (c->state == C_READING && !c->dead) {
        if (c->peer_eof) {
            /* The client sent all it will; an incomplete request is dropped. */
            c->state = C_FLUSHING;
            timer_set(c, GW_T_NONE);
        } else if (!c->reading && evbuffer_get_length(c->in) < IN_HIGH) {
            read_enable(c, true);
        }
    }
    c->processing = false;
}

/* Writes what the output holds, at most FLUSH_MAX bytes. GW_OK: all sent;
 * GW_AGAIN: the socket is full, or FLUSH_MAX went out, and the write event
 * is armed; GW_ERR: the connection is closed. */
static int
conn_flush(gw_conn_t *c)
{
    size_t sent = 0;
    while (evbuffer_get_length(c->out) > 0) {
        int n = -1, err = EAGAIN; /* past FLUSH_MAX: the rest when writable again, after the other events */
        if (sent < FLUSH_MAX) {
            n = evbuffer_write(c->out, c->fd);
            err = errno;
        }
        if (n >= 0) {
            sent += (size_t)n;
            c->out_sent += (uint64_t)n;
            continue;
        }
        if (err == EINTR)
            continue;
        if (err == EAGAIN || err == EWOULDBLOCK) {
            if (!c->writing) {
                c->writing = true;
                event_add(c->wev, c->w->timeouts[GW_T_SEND]);
            }
            return GW_AGAIN;
        }
        if (err != ECONNRESET && err != EPIPE)
            gw_log_rl(GW_LOG_INFO, "client %s: %s while sending response", c->peer, strerror(err));
        gw_conn_close(c);
        return GW_ERR;
    }
    if (c->writing) {
        c->writing = false;
        event_del(c->wev);
    }
    return GW_OK;
}

/* Arms the next look at a probed socket: 1, 2, 4, ... ms after the probe,
 * then every GW_GONE_POLL_MS. A closed socket answers the probe within a
 * round trip, so a client that went away is seen about then (its queued
 * call leaves the wait queue at once), not a whole poll period later. */
static void
gone_timer(gw_conn_t *c)
{
    unsigned ms = c->gone_polls < 7 ? 1u << c->gone_polls : GW_GONE_POLL_MS;
    c->gone_polls++;
    c->timer_kind = GW_T_GONE;
    struct timeval tv = { 0, (suseconds_t)GW_MIN(ms, GW_GONE_POLL_MS) * 1000 };
    event_add(c->timer, &tv);
}

/* The client sent EOF while its request is in flight (see the top of the
 * file). Whether it is gone is looked at by gone_timer(). */
static void
watch_gone(gw_conn_t *c)
{
    c->watching = true;
    if (!c->probed && !c->resp_started && c->req.http_minor >= 1) {
        evbuffer_add(c->out, "HTTP/1.1 100 Continue\r\n\r\n", 25);
        c->probed = true;
        c->gone_polls = 0;
    }
    if (c->probed)
        gone_timer(c);
}

/* Whether the client's socket was reset (by a probe sent after its EOF). */
static bool
peer_reset(gw_conn_t *c)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    int err = 0;
    socklen_t elen = sizeof(err);
    if (getsockopt(c->fd, IPPROTO_TCP, TCP_INFO, &ti, &len) == 0 && ti.tcpi_state == TCP_CLOSE)
        return true;
    return getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &elen) == 0 && err != 0;
}

/* The client sent EOF and a request is in flight: a body that can no
 * longer arrive whole means the client is gone; a request read whole is
 * answered (watch_gone tells a client that went away). */
static void
peer_eof_in_flight(gw_conn_t *c)
{
    if (c->body_stream && !c->body_paused && evbuffer_get_length(c->in) == 0) {
        gw_log_rl(GW_LOG_INFO, "client %s: closed the connection before the end of the body of request %s", c->peer,
               c->req.request_id);
        const gw_conn_async_t *ops = c->async;
        c->async = NULL;
        ops->cancel(c->async_ctx);
        c->body_stream = false;
        if (c->resp_started) {
            gw_conn_close(c); /* a cut response must not look whole */
        } else {
            /* the answers to earlier requests still go out, as for an
             * incomplete request that is still being read; this one is
             * logged as the client's (499) */
            note_request(c);
            gw_alog_rec_reset(&c->alog);
            c->state = C_FLUSHING;
            timer_set(c, GW_T_NONE);
        }
    } else if (!c->body_stream && !c->watching) {
        watch_gone(c);
    }
}

/* Handles what can be handled, sends what can be sent, and moves on to
 * closing once the last response is out. */
static void
conn_run_rounds(gw_conn_t *c)
{
    for (int rounds = 0; rounds < 64 && !c->dead; rounds++) {
        conn_process(c);
        if (!c->dead && c->peer_eof && c->state == C_HANDLING && c->async)
            peer_eof_in_flight(c);
        if (c->dead || conn_flush(c) != GW_OK)
            return;
        if (c->state == C_HANDLING && c->async && c->want_drained) {
            c->want_drained = false;
            c->async->drained(c->async_ctx); /* only resumes its producer */
        }
        if (c->state == C_FLUSHING) {
            if (c->peer_eof || shutdown(c->fd, SHUT_WR) != 0) {
                gw_conn_close(c);
            } else {
                c->state = C_LINGERING;
                read_enable(c, true);
                timer_set(c, GW_T_LINGER);
            }
            return;
        }
        if (!c->wait_write)
            return;
        c->wait_write = false; /* the output drained: take more requests */
    }
}

/* conn_run_rounds(), then files the connection as idle or not. */
static void
conn_run(gw_conn_t *c)
{
    conn_run_rounds(c);
    idle_update(c);
}

static void
conn_read_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_conn_t *c = arg;
    GW_UNUSED(what);
    struct evbuffer_iovec v;
    if (c->state == C_LINGERING) {
        char scratch[4096];
        ssize_t n = recv(fd, scratch, sizeof(scratch), 0);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
            gw_conn_close(c);
        gw_conn_release(c);
        return;
    }
    if (evbuffer_reserve_space(c->in, READ_CHUNK, &v, 1) < 1) {
        gw_conn_close(c);
        gw_conn_release(c);
        return;
    }
    ssize_t n = recv(fd, v.iov_base, v.iov_len, 0);
    if (n > 0) {
        idle_unlink(c); /* busy; conn_run files it again once idle */
        v.iov_len = (size_t)n;
        evbuffer_commit_space(c->in, &v, 1);
        if (evbuffer_get_length(c->in) >= IN_HIGH)
            read_enable(c, false); /* conn_process enables it again once drained */
    } else if (n == 0) {
        c->peer_eof = true; /* conn_run tells a half-close from a client gone */
        read_enable(c, false);
    } else {
        int err = errno;
        if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR)
            return;
        if (err != ECONNRESET)
            gw_log_rl(GW_LOG_INFO, "client %s: %s while reading request", c->peer, strerror(err));
        gw_conn_close(c);
        gw_conn_release(c);
        return;
    }
    gw_conn_adopt_gen(c);
    conn_run(c);
    gw_conn_release(c);
}

static void
conn_write_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_conn_t *c = arg;
    GW_UNUSED(fd);
    if (what & EV_TIMEOUT) {
        gw_log_rl(GW_LOG_INFO, "client %s: timed out after %d ms while sending response", c->peer,
               c->cfg->http.send_timeout_ms);
        gw_conn_close(c);
    } else {
        conn_run(c);
    }
    gw_conn_release(c);
}

static void
conn_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_conn_t *c = arg;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    gw_timer_t kind = c->timer_kind;
    c->timer_kind = GW_T_NONE;
    switch (kind) {
    case GW_T_HEADER:
        if (c->parser.started)
            reject(c, 408, "client sent no complete request head in time");
        else
            gw_conn_close(c);
        break;
    case GW_T_BODY:
        if (c->body_stream)
            body_failed(c, 408, "client sent no request body bytes in time");
        else
            reject(c, 408, "client sent no request body bytes in time");
        break;
    case GW_T_GONE:
        if (!c->watching) {
            break;
        } else if (peer_reset(c)) {
            /* The client is gone: cancel its calls (nginx: 499). */
            gw_log_rl(GW_LOG_INFO, "client %s: closed the connection while request %s was in flight", c->peer,
                   c->req.request_id);
            gw_conn_close(c);
        } else {
            gone_timer(c);
        }
        break;
    default:
        gw_conn_close(c);
        break;
    }
    gw_conn_release(c);
}

static void
format_peer(const struct sockaddr *sa, char *buf, size_t len)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip));
        snprintf(buf, len, "%s:%u", ip, ntohs(in->sin_port));
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip));
        snprintf(buf, len, "[%s]:%u", ip, ntohs(in6->sin6_port));
    } else {
        snprintf(buf, len, "unix");
    }
}

void
gw_conn_accept(gw_worker_t *w, evutil_socket_t fd, const struct sockaddr *sa, int salen)
{
    GW_UNUSED(salen);
    gw_conn_t *c = gw_calloc(1, sizeof(gw_conn_t));
    c->w = w;
    c->fd = fd;
    c->gen = gw_server_gen_ref(w);
    c->cfg = c->gen->cfg;
    format_peer(sa, c->peer, sizeof(c->peer));
    snprintf(c->peer_ip, sizeof(c->peer_ip), "%s", c->peer);
    if (c->peer_ip[0] == '[') {
        memmove(c->peer_ip, c->peer_ip + 1, strlen(c->peer_ip));
        *strchr(c->peer_ip, ']') = '\0';
    } else if (strrchr(c->peer_ip, ':')) {
        *strrchr(c->peer_ip, ':') = '\0';
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    c->rev = event_new(w->base, fd, EV_READ | EV_PERSIST, conn_read_cb, c);
    c->wev = event_new(w->base, fd, EV_WRITE | EV_PERSIST, conn_write_cb, c);
    c->timer = evtimer_new(w->base, conn_timer_cb, c);
    c->in = evbuffer_new();
    c->out = evbuffer_new();
    if (c->rev == NULL || c->wev == NULL || c->timer == NULL || c->in == NULL || c->out == NULL) {
        gw_log_rl(GW_LOG_ERR, "client %s: out of memory while accepting", c->peer);
        abort(); /* our allocation policy: out of memory is fatal */
    }
    gw_parser_init(&c->parser, &c->req, &c->cfg->http);
    c->next = w->conns;
    if (w->conns)
        w->conns->prev = c;
    w->conns = c;
    w->nconns++;
    c->state = C_READING;
    gw_alog_rec_reset(&c->alog);
    read_enable(c, true);
    timer_set(c, GW_T_HEADER);
    c->idle_since_us = gw_now_us();
    idle_update(c);
}

void
gw_conn_adopt_gen(gw_conn_t *c)
{
    gw_worker_t *w = c->w;
    if (c->gen == w->gen || c->state != C_READING || c->parser.started || c->async || c->dead)
        return;
    gw_gen_t *old = c->gen;
    c->gen = gw_server_gen_ref(w);
    c->cfg = c->gen->cfg;
    c->parser.limits = &c->cfg->http;
    gw_parser_set_body_limit(&c->parser, c->cfg->http.max_body_bytes);
    gw_server_gen_unref(w, old);
}

void
gw_conn_shutdown(gw_conn_t *c)
{
    /* The next response says Connection: close (decide_close sees the
     * worker stopping); an idle connection gets GW_T_DRAIN to send it. */
    if (c->state == C_READING && !c->parser.started && evbuffer_get_length(c->in) == 0 &&
        evbuffer_get_length(c->out) == 0) {
        if (c->peer_eof)
            gw_conn_close(c);
        else
            timer_set(c, GW_T_DRAIN);
    }
    gw_conn_release(c);
}

/* --- async handlers (see gw_conn.h) ------------------------------------- */

void
gw_conn_begin_async(gw_conn_t *c, const gw_conn_async_t *ops, void *ctx)
{
    c->async = ops;
    c->async_ctx = ctx;
    c->want_drained = false;
}

gw_req_t *
gw_conn_req(gw_conn_t *c)
{
    return &c->req;
}

gw_worker_t *
gw_conn_worker(gw_conn_t *c)
{
    return c->w;
}

gw_config_t *
gw_conn_config(gw_conn_t *c)
{
    return c->cfg;
}

const char *
gw_conn_client_ip(gw_conn_t *c)
{
    return gw_realip_get(c->cfg, &c->req, c->peer_ip);
}

bool
gw_conn_peer_trusted(gw_conn_t *c)
{
    return gw_realip_peer_trusted(c->cfg, &c->req, c->peer_ip);
}

const char *
gw_conn_peer_ip(gw_conn_t *c)
{
    return c->peer_ip;
}

void
gw_conn_error(gw_conn_t *c, int status, const char *code, const char *extra)
{
    c->async = NULL;
    respond_error_json(c, status, code, NULL, extra, NULL);
}

void
gw_conn_error_headers(gw_conn_t *c, int status, const char *code, const char *extra, const char *headers)
{
    c->async = NULL;
    respond_error_json(c, status, code, NULL, extra, headers);
}

void
gw_conn_start_response(gw_conn_t *c, int status, const char *headers, size_t len, int64_t content_length)
{
    decide_close(c);
    c->resp_started = true;
    c->resp_at = c->out_sent + evbuffer_get_length(c->out);
    c->no_body = c->req.method == HTTP_HEAD || status == 204 || status == 304 || (status >= 100 && status < 200);
    c->chunked_out = false;
    if (content_length < 0 && !c->no_body) {
        if (c->req.http_minor >= 1)
            c->chunked_out = true;
        else
            c->close_after = true; /* HTTP/1.0: the end of the body is the end of the connection */
    }
    write_response(c, status, headers, len, NULL, content_length, false);
    if (c->alog.up_start_us && c->alog.up_us < 0) /* proxy: time to the backend's response head */
        c->alog.up_us = (int64_t)(gw_now_us() - c->alog.up_start_us);
}

void
gw_conn_body(gw_conn_t *c, const char *data, size_t len)
{
    if (c->no_body || len == 0)
        return;
    c->alog.bytes += len;
    if (c->chunked_out) {
        char size[24];
        int n = snprintf(size, sizeof(size), "%zx\r\n", len);
        evbuffer_add(c->out, size, (size_t)n);
        evbuffer_add(c->out, data, len);
        evbuffer_add(c->out, "\r\n", 2);
    } else {
        evbuffer_add(c->out, data, len);
    }
}

static void
body_take_free(const void *data, size_t len, void *arg)
{
    GW_UNUSED(len);
    GW_UNUSED(arg);
    free((void *)data);
}

void
gw_conn_body_take(gw_conn_t *c, char *data, size_t len)
{
    if (c->no_body || len == 0 || c->chunked_out) {
        gw_conn_body(c, data, len);
        free(data);
        return;
    }
    c->alog.bytes += len;
    if (evbuffer_add_reference(c->out, data, len, body_take_free, NULL) != 0) {
        gw_log(GW_LOG_ERR, "client %s: out of memory while queueing a response", c->peer);
        abort(); /* our allocation policy: out of memory is fatal */
    }
}

bool
gw_conn_send(gw_conn_t *c)
{
    if (conn_flush(c) == GW_ERR)
        return false; /* closed; cancel comes with gw_conn_release() */
    if (evbuffer_get_length(c->out) > OUT_HIGH) {
        c->want_drained = true;
        return false;
    }
    return true;
}

void
gw_conn_end_response(gw_conn_t *c)
{
    if (c->chunked_out)
        evbuffer_add(c->out, "0\r\n\r\n", 5);
    c->async = NULL;
    request_done(c);
}

bool
gw_conn_body_done(gw_conn_t *c)
{
    return !c->body_stream;
}

void
gw_conn_body_pause(gw_conn_t *c, bool pause)
{
    if (!c->body_stream || pause == c->body_paused)
        return;
    c->body_paused = pause;
    if (pause) {
        timer_set(c, GW_T_NONE); /* waiting for the backend is not the client's delay */
        return;
    }
    timer_set(c, GW_T_BODY);
    if (!c->processing)
        conn_run(c); /* the input may hold body bytes already */
}

bool
gw_conn_take_back(gw_conn_t *c)
{
    if (!c->resp_started || c->out_sent > c->resp_at)
        return false;
    /* keep what earlier responses still have queued, drop this one's bytes */
    size_t keep = (size_t)(c->resp_at - c->out_sent);
    if (keep == 0) {
        evbuffer_drain(c->out, evbuffer_get_length(c->out));
    } else {
        struct evbuffer *earlier = evbuffer_new();
        evbuffer_remove_buffer(c->out, earlier, keep);
        evbuffer_drain(c->out, evbuffer_get_length(c->out));
        evbuffer_add_buffer(c->out, earlier);
        evbuffer_free(earlier);
    }
    c->resp_started = false;
    c->chunked_out = c->no_body = false;
    c->alog.bytes = 0;
    return true;
}

void
gw_conn_abort(gw_conn_t *c)
{
    c->async = NULL;
    gw_conn_close(c);
}
