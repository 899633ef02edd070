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
 * Freeing: gw_conn_close() only marks the connection; conn_release() at the
 * end of every entry point (bufferevent and timer callbacks, the worker's
 * stop) frees it once nothing up the stack uses it.
 */
#include "gw_conn.h"
#include "gw_config.h"
#include "gw_http.h"
#include "gw_log.h"
#include "gw_router.h"
#include "gw_server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* Stop taking pipelined requests while this much output is unsent. */
#define OUT_HIGH (256 * 1024)
/* Stop reading from the client while this much input is unparsed. */
#define IN_HIGH (64 * 1024)

typedef enum { C_READING, C_HANDLING, C_FLUSHING, C_LINGERING } conn_state_t;
typedef enum { T_NONE, T_HEADER, T_BODY, T_KEEPALIVE, T_LINGER } timer_kind_t;

struct gw_conn_s {
    gw_worker_t *w;
    gw_conn_t *prev, *next;
    struct bufferevent *bev;
    evutil_socket_t fd;
    struct event *timer;
    timer_kind_t timer_kind;
    conn_state_t state;
    gw_config_t *cfg; /* one reference, taken at accept */
    gw_parser_t parser;
    gw_req_t req;
    unsigned requests;
    bool close_after; /* no further request on this connection */
    bool wait_write;  /* paused: too much output pending */
    bool peer_eof;
    bool processing;  /* conn_process is on the stack */
    bool dead;        /* marked for freeing */
    char peer[64];
};

static void conn_process(gw_conn_t *c);

gw_conn_t *
gw_conn_next(gw_conn_t *c)
{
    return c->next;
}

static void
conn_free(gw_conn_t *c)
{
    gw_worker_t *w = c->w;
    if (c->prev)
        c->prev->next = c->next;
    else
        w->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    event_free(c->timer);
    bufferevent_free(c->bev); /* closes fd */
    gw_parser_free(&c->parser);
    gw_config_unref(c->cfg);
    free(c);
    gw_server_conn_closed(w);
}

void
gw_conn_close(gw_conn_t *c)
{
    c->dead = true;
    bufferevent_disable(c->bev, EV_READ | EV_WRITE);
    event_del(c->timer);
}

/* Frees c when it was marked. Called only as the last step of an entry
 * point (a libevent callback or the worker's stop), never deeper. */
void
gw_conn_release(gw_conn_t *c)
{
    if (c->dead)
        conn_free(c);
}

static void
timer_set(gw_conn_t *c, timer_kind_t kind, int ms)
{
    c->timer_kind = kind;
    if (kind == T_NONE) {
        event_del(c->timer);
        return;
    }
    struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
    event_add(c->timer, &tv);
}

static void
write_head(gw_conn_t *c, struct evbuffer *out, int status, const char *extra, size_t extra_len, size_t clen)
{
    const char *id = c->req.request_id[0] ? c->req.request_id : NULL;
    char genid[33];
    if (id == NULL) {
        gw_http_new_request_id(genid);
        id = genid;
    }
    char head[512];
    int n = snprintf(head, sizeof(head), "HTTP/1.1 %d %s\r\nDate: %s\r\nServer: gatherd\r\nX-Request-Id: %s\r\n",
                     status, gw_http_status_text(status), gw_http_date(), id);
    evbuffer_add(out, head, (size_t)n);
    if (extra_len)
        evbuffer_add(out, extra, extra_len);
    bool ka_10 = !c->close_after && c->req.http_minor == 0;
    const char *conn = c->close_after ? "Connection: close\r\n" : ka_10 ? "Connection: keep-alive\r\n" : "";
    if (status == 204)
        n = snprintf(head, sizeof(head), "%s\r\n", conn);
    else
        n = snprintf(head, sizeof(head), "Content-Length: %zu\r\n%s\r\n", clen, conn);
    evbuffer_add(out, head, (size_t)n);
}

/* After a response: close, or get ready for the next request. */
static void
request_done(gw_conn_t *c)
{
    c->requests++;
    if (c->close_after) {
        c->state = C_FLUSHING;
        bufferevent_disable(c->bev, EV_READ);
        timer_set(c, T_NONE, 0);
        return; /* conn_write_cb continues once the output is sent */
    }
    gw_parser_next(&c->parser);
    c->state = C_READING;
    size_t pending = evbuffer_get_length(bufferevent_get_input(c->bev));
    timer_set(c, pending ? T_HEADER : T_KEEPALIVE,
              pending ? c->cfg->http.client_header_timeout_ms : c->cfg->http.keepalive_timeout_ms);
    bufferevent_enable(c->bev, EV_READ);
    conn_process(c); /* does nothing when already running further up */
}

/*
 * Sends a whole response. headers: extra header lines ("Name: v\r\n"...),
 * borrowed. No body is sent for HEAD, 1xx, 204 and 304.
 */
static void
respond(gw_conn_t *c, int status, const char *headers, size_t headers_len, const char *body, size_t body_len)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    if (c->requests + 1 >= c->cfg->http.max_keepalive_requests || c->w->stopping || !c->req.keep_alive ||
        c->peer_eof)
        c->close_after = true;
    bool no_body = c->req.method == HTTP_HEAD || status == 204 || status == 304;
    write_head(c, out, status, headers, headers_len, body_len);
    if (!no_body && body_len)
        evbuffer_add(out, body, body_len);
    request_done(c);
}

static void
respond_error(gw_conn_t *c, int status, const char *code, const char *message, const char *extra)
{
    char body[512];
    int n = snprintf(body, sizeof(body), "{\"error\":{\"code\":\"%s\",\"message\":\"%s\",\"request_id\":\"%s\"}}",
                     code, message, c->req.request_id);
    char hdrs[512];
    int h = snprintf(hdrs, sizeof(hdrs), "Content-Type: application/json\r\n%s", extra ? extra : "");
    respond(c, status, hdrs, (size_t)h, body, (size_t)n);
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
                  { 431, "headers_too_large" }, { 505, "version_not_supported" } };
    const char *code = "bad_request";
    for (size_t i = 0; i < GW_NELEM(codes); i++)
        if (codes[i].status == status)
            code = codes[i].code;
    gw_log(status == 408 ? GW_LOG_INFO : GW_LOG_NOTICE, "client %s: %d %s while reading request%s%s", c->peer,
           status, reason, c->req.request_id[0] ? ", request " : "", c->req.request_id);
    /* The reason is our static text or llhttp's; neither holds quotes. */
    c->close_after = true;
    c->req.keep_alive = false;
    c->state = C_HANDLING;
    respond_error(c, status, code, reason, NULL);
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
        respond_error(c, 405, "method_not_allowed", "method not allowed for this path", hdr);
        return;
    }
    default:
        respond_error(c, 404, "not_found", "no route for this path", NULL);
        return;
    }
    const gw_route_t *route = m.route;
    switch (route->kind) {
    case GW_ROUTE_RESPOND:
        respond(c, route->respond.status, route->respond.head, route->respond.head_len, route->respond.body,
                route->respond.body_len);
        return;
    }
    respond_error(c, 500, "internal", "route kind not handled", NULL);
}

/* Parses and answers what the input holds, in order, until it needs more
 * bytes, a response is pending, or the connection is closing. */
static void
conn_process(gw_conn_t *c)
{
    if (c->processing)
        return; /* the loop further up the stack picks up the new state */
    c->processing = true;
    struct evbuffer *in = bufferevent_get_input(c->bev);
    struct evbuffer *out = bufferevent_get_output(c->bev);
    while (c->state == C_READING && !c->dead) {
        size_t avail = evbuffer_get_length(in);
        if (avail == 0)
            break;
        if (evbuffer_get_length(out) > OUT_HIGH) {
            c->wait_write = true; /* conn_write_cb resumes */
            break;
        }
        if (c->timer_kind == T_KEEPALIVE)
            timer_set(c, T_HEADER, c->cfg->http.client_header_timeout_ms);
        struct evbuffer_iovec v;
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1)
            break;
        size_t used = 0;
        gw_parse_result_t pr = gw_parser_execute(&c->parser, v.iov_base, v.iov_len, &used);
        evbuffer_drain(in, used);
        switch (pr) {
        case GW_PARSE_AGAIN:
            if (c->parser.headers_done)
                timer_set(c, T_BODY, c->cfg->http.client_body_timeout_ms);
            break;
        case GW_PARSE_HEADERS:
            evbuffer_add(out, "HTTP/1.1 100 Continue\r\n\r\n", 25);
            gw_parser_resume(&c->parser);
            timer_set(c, T_BODY, c->cfg->http.client_body_timeout_ms);
            break;
        case GW_PARSE_DONE:
            timer_set(c, T_NONE, 0);
            c->state = C_HANDLING;
            dispatch(c);
            break;
        case GW_PARSE_ERROR:
            timer_set(c, T_NONE, 0);
            reject(c, c->parser.status, c->parser.reason);
            break;
        }
    }
    if (c->state == C_READING && c->peer_eof && !c->dead) {
        /* The client sent all it will; an incomplete request is dropped. */
        if (evbuffer_get_length(out) == 0)
            gw_conn_close(c);
        else {
            c->state = C_FLUSHING;
            bufferevent_disable(c->bev, EV_READ);
        }
    }
    c->processing = false;
}

static void
conn_read_cb(struct bufferevent *bev, void *arg)
{
    gw_conn_t *c = arg;
    if (c->state == C_LINGERING) {
        struct evbuffer *in = bufferevent_get_input(bev);
        evbuffer_drain(in, evbuffer_get_length(in));
        return;
    }
    conn_process(c);
    gw_conn_release(c);
}

static void
conn_write_cb(struct bufferevent *bev, void *arg)
{
    gw_conn_t *c = arg;
    if (c->state == C_FLUSHING) {
        if (evbuffer_get_length(bufferevent_get_output(bev)) > 0)
            return;
        if (c->peer_eof || shutdown(c->fd, SHUT_WR) != 0) {
            gw_conn_close(c);
        } else {
            c->state = C_LINGERING;
            bufferevent_enable(bev, EV_READ);
            timer_set(c, T_LINGER, c->cfg->http.lingering_timeout_ms);
        }
    } else if (c->wait_write) {
        c->wait_write = false;
        conn_process(c);
    }
    gw_conn_release(c);
}

static void
conn_event_cb(struct bufferevent *bev, short what, void *arg)
{
    gw_conn_t *c = arg;
    GW_UNUSED(bev);
    if (what & BEV_EVENT_EOF) {
        c->peer_eof = true;
        if (c->state == C_READING) {
            conn_process(c);
        } else if (c->state == C_LINGERING) {
            gw_conn_close(c);
        }
        /* HANDLING and FLUSHING finish their response first. */
    } else if (what & BEV_EVENT_ERROR) {
        int err = EVUTIL_SOCKET_ERROR();
        if (c->state != C_LINGERING && err != ECONNRESET && err != EPIPE)
            gw_log(GW_LOG_INFO, "client %s: %s while %s", c->peer, strerror(err),
                   (what & BEV_EVENT_READING) ? "reading request" : "sending response");
        gw_conn_close(c);
    } else if (what & BEV_EVENT_TIMEOUT) {
        gw_log(GW_LOG_INFO, "client %s: timed out after %d ms while sending response", c->peer,
               c->cfg->http.send_timeout_ms);
        gw_conn_close(c);
    }
    gw_conn_release(c);
}

static void
conn_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    gw_conn_t *c = arg;
    GW_UNUSED(fd);
    GW_UNUSED(what);
    timer_kind_t kind = c->timer_kind;
    c->timer_kind = T_NONE;
    switch (kind) {
    case T_HEADER:
        if (c->parser.started)
            reject(c, 408, "client sent no complete request head in time");
        else
            gw_conn_close(c);
        break;
    case T_BODY:
        reject(c, 408, "client sent no request body bytes in time");
        break;
    case T_KEEPALIVE:
    case T_LINGER:
    case T_NONE:
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
    c->cfg = gw_config_ref(w->cfg);
    format_peer(sa, c->peer, sizeof(c->peer));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    c->bev = bufferevent_socket_new(w->base, fd, BEV_OPT_CLOSE_ON_FREE);
    c->timer = evtimer_new(w->base, conn_timer_cb, c);
    gw_parser_init(&c->parser, &c->req, &c->cfg->http);
    bufferevent_setcb(c->bev, conn_read_cb, conn_write_cb, conn_event_cb, c);
    bufferevent_setwatermark(c->bev, EV_READ, 0, IN_HIGH);
    struct timeval send_tv = { c->cfg->http.send_timeout_ms / 1000, (c->cfg->http.send_timeout_ms % 1000) * 1000 };
    bufferevent_set_timeouts(c->bev, NULL, &send_tv);
    bufferevent_enable(c->bev, EV_READ | EV_WRITE);
    c->next = w->conns;
    if (w->conns)
        w->conns->prev = c;
    w->conns = c;
    w->nconns++;
    c->state = C_READING;
    timer_set(c, T_HEADER, c->cfg->http.client_header_timeout_ms);
}

void
gw_conn_shutdown(gw_conn_t *c)
{
    c->close_after = true;
    if (c->state == C_READING && !c->parser.started &&
        evbuffer_get_length(bufferevent_get_input(c->bev)) == 0 &&
        evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
        gw_conn_close(c);
    gw_conn_release(c);
}
