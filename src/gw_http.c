/*
 * gw_http.c - downstream request parsing on top of llhttp, and response
 * head helpers (see gw_http.h for the strictness rules).
 *
 * The target and header bytes of a request are copied into one growing
 * buffer (req->hbuf) as llhttp hands them over, possibly in pieces; headers
 * are recorded as offsets into it. Nothing is allocated per request once a
 * connection's buffers have grown to fit its requests.
 */
#include "gw_http.h"

#include <event2/buffer.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

#define PARSER(ll) ((gw_parser_t *)(ll)->data)

static int
set_error(gw_parser_t *p, int status, const char *reason)
{
    p->status = status;
    p->reason = reason;
    return HPE_USER;
}

static int
append(gw_parser_t *p, const char *at, size_t len)
{
    gw_req_t *r = p->req;
    gw_grow((void **)&r->hbuf, &r->hcap, r->hlen + len, 1);
    memcpy(r->hbuf + r->hlen, at, len);
    r->hlen += len;
    if (r->hlen - r->url_len > p->limits->max_header_bytes)
        return set_error(p, 431, "request headers too large");
    return 0;
}

static int
on_message_begin(llhttp_t *ll)
{
    PARSER(ll)->started = true;
    return 0;
}

static int
on_url(llhttp_t *ll, const char *at, size_t len)
{
    gw_parser_t *p = PARSER(ll);
    p->req->url_len += len;
    if (p->req->url_len > p->limits->max_url_bytes)
        return set_error(p, 414, "request URI too long");
    return append(p, at, len);
}

/*
 * Trailer fields (after a chunked body) arrive through the same callbacks
 * as headers. They are counted against max_header_bytes and dropped: a
 * trailer must never be taken for a header (it could forge
 * X-Forwarded-For or Host after the request was routed).
 */
static int
trailer_bytes(gw_parser_t *p, size_t len)
{
    p->trailer_len += len;
    if (p->trailer_len > p->limits->max_header_bytes)
        return set_error(p, 431, "request trailers too large");
    return 0;
}

static int
on_header_field(llhttp_t *ll, const char *at, size_t len)
{
    gw_parser_t *p = PARSER(ll);
    if (p->headers_done)
        return trailer_bytes(p, len);
    if (!p->in_field) {
        p->in_field = true;
        p->cur_off = (uint32_t)p->req->hlen;
        p->cur_len = 0;
    }
    p->cur_len += (uint32_t)len;
    return append(p, at, len);
}

static bool
is_tchar(unsigned char c)
{
    static const char extra[] = "!#$%&'*+-.^_`|~";
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && memchr(extra, c, sizeof(extra) - 1) != NULL);
}

static int
on_header_field_complete(llhttp_t *ll)
{
    gw_parser_t *p = PARSER(ll);
    gw_req_t *r = p->req;
    if (p->headers_done)
        return 0;
    if (!p->in_field || p->cur_len == 0)
        return set_error(p, 400, "empty header name");
    for (uint32_t i = 0; i < p->cur_len; i++)
        if (!is_tchar((unsigned char)r->hbuf[p->cur_off + i]))
            return set_error(p, 400, "invalid character in header name");
    p->in_field = false;
    if (r->nheaders >= p->limits->max_headers)
        return set_error(p, 431, "too many request headers");
    gw_grow((void **)&r->headers, &r->headers_cap, r->nheaders + 1, sizeof(gw_header_t));
    gw_header_t *h = &r->headers[r->nheaders];
    h->name_off = p->cur_off;
    h->name_len = p->cur_len;
    h->value_off = (uint32_t)r->hlen;
    h->value_len = 0;
    return 0;
}

static int
on_header_value(llhttp_t *ll, const char *at, size_t len)
{
    gw_parser_t *p = PARSER(ll);
    if (p->headers_done)
        return trailer_bytes(p, len);
    p->req->headers[p->req->nheaders].value_len += (uint32_t)len;
    return append(p, at, len);
}

static bool
name_is(const gw_req_t *r, const gw_header_t *h, const char *name, size_t len)
{
    return h->name_len == len && strncasecmp(r->hbuf + h->name_off, name, len) == 0;
}

#define NAME_IS(r, h, lit) name_is(r, h, lit, sizeof(lit) - 1)

static int
on_header_value_complete(llhttp_t *ll)
{
    gw_parser_t *p = PARSER(ll);
    gw_req_t *r = p->req;
    if (p->headers_done)
        return 0;
    gw_header_t *h = &r->headers[r->nheaders];
    const unsigned char *v = (const unsigned char *)r->hbuf + h->value_off;
    for (uint32_t i = 0; i < h->value_len; i++)
        if ((v[i] < 0x20 && v[i] != '\t') || v[i] == 0x7f)
            return set_error(p, 400, "invalid character in header value");
    while (h->value_len > 0 && (v[h->value_len - 1] == ' ' || v[h->value_len - 1] == '\t'))
        h->value_len--;
    r->nheaders++;
    if (NAME_IS(r, h, "host"))
        p->nhost++;
    else if (NAME_IS(r, h, "expect")) {
        if (h->value_len == 12 && strncasecmp((const char *)v, "100-continue", 12) == 0)
            r->expect_continue = true;
        else
            return set_error(p, 417, "unsupported Expect value");
    }
    return 0;
}

static bool
id_char(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '-' || c == '_' ||
           c == '.' || c == ':' || c == '+' || c == '/' || c == '=';
}

/* A client's X-Request-Id is kept when it is short and plain, so it can
 * go into logs and upstream headers without escaping. */
static void
set_request_id(gw_req_t *r)
{
    size_t len;
    const char *id = gw_req_header(r, "x-request-id", &len);
    bool sane = id != NULL && len >= 1 && len < 64;
    for (size_t i = 0; sane && i < len; i++)
        sane = id_char((unsigned char)id[i]);
    if (sane) {
        memcpy(r->request_id, id, len);
        r->request_id[len] = '\0';
    } else {
        gw_http_new_request_id(r->request_id);
    }
}

static int
split_target(gw_parser_t *p)
{
    gw_req_t *r = p->req;
    const char *u = r->hbuf + r->url_off;
    size_t n = r->url_len;
    size_t start = 0;
    if (n >= 7 && (strncasecmp(u, "http://", 7) == 0 || (n >= 8 && strncasecmp(u, "https://", 8) == 0))) {
        /* absolute-form: the authority is ignored, the path is routed */
        start = (u[4] == ':') ? 7 : 8;
        while (start < n && u[start] != '/' && u[start] != '?')
            start++;
    } else if (n == 0 || u[0] != '/') {
        return set_error(p, 400, "request target must be an absolute path");
    }
    size_t end = start;
    while (end < n && u[end] != '?' && u[end] != '#')
        end++;
    r->path_off = r->url_off + start;
    r->path_len = end - start;
    if (end < n && u[end] == '?') {
        size_t q = end + 1, qe = q;
        while (qe < n && u[qe] != '#')
            qe++;
        r->query_off = r->url_off + q;
        r->query_len = qe - q;
    }
    if (gw_router_normalize(r->hbuf + r->path_off, r->path_len, &r->path) != GW_OK)
        return set_error(p, 400, "invalid path (bad escape, encoded NUL, or \"..\" above the root)");
    return 0;
}

static int
on_headers_complete(llhttp_t *ll)
{
    gw_parser_t *p = PARSER(ll);
    gw_req_t *r = p->req;
    p->headers_done = true;
    r->method = ll->method;
    r->http_major = ll->http_major;
    r->http_minor = ll->http_minor;
    set_request_id(r);
    if (r->http_major != 1) {
        set_error(p, r->http_major >= 2 ? 505 : 400, "unsupported HTTP version");
        return -1;
    }
    if ((r->http_minor == 1 && p->nhost != 1) || p->nhost > 1) {
        set_error(p, 400, p->nhost ? "more than one Host header" : "missing Host header");
        return -1;
    }
    if (r->method == HTTP_CONNECT) {
        set_error(p, 405, "CONNECT is not supported");
        return -1;
    }
    if (split_target(p) != 0)
        return -1;
    /* No protocol upgrades: the request is answered as plain HTTP. */
    ll->upgrade = 0;
    r->has_body = (ll->flags & F_CHUNKED) || ll->content_length > 0;
    r->chunked = (ll->flags & F_CHUNKED) != 0;
    r->content_length = r->chunked ? -1 : (int64_t)ll->content_length;
    if (r->http_minor == 0)
        r->expect_continue = false; /* RFC 9110: ignore Expect from HTTP/1.0 */
    if (r->has_body) {
        /* The caller routes the request before its body is read: the
         * route decides the body limit and whether the body streams. */
        p->paused_at_headers = true;
        return HPE_PAUSED;
    }
    return 0;
}

static int
on_body(llhttp_t *ll, const char *at, size_t len)
{
    gw_parser_t *p = PARSER(ll);
    gw_req_t *r = p->req;
    r->body_len += len;
    if (r->body_len > p->body_limit)
        return set_error(p, 413, "request body too large");
    evbuffer_add(r->body, at, len);
    return 0;
}

static int
on_message_complete(llhttp_t *ll)
{
    gw_parser_t *p = PARSER(ll);
    p->req->keep_alive = llhttp_should_keep_alive(ll);
    return HPE_PAUSED;
}

static llhttp_settings_t settings;

static void
settings_build(void)
{
    llhttp_settings_init(&settings);
    settings.on_message_begin = on_message_begin;
    settings.on_url = on_url;
    settings.on_header_field = on_header_field;
    settings.on_header_field_complete = on_header_field_complete;
    settings.on_header_value = on_header_value;
    settings.on_header_value_complete = on_header_value_complete;
    settings.on_headers_complete = on_headers_complete;
    settings.on_body = on_body;
    settings.on_message_complete = on_message_complete;
}

static void
settings_init(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, settings_build);
}

static void
scan_reset(gw_parser_t *p)
{
    p->scan_done = false;
    p->scan_line_start = true;
    p->scan_first_line = true;
    p->scan_prev = '\0';
}

void
gw_parser_init(gw_parser_t *p, gw_req_t *req, const gw_http_limits_t *limits)
{
    settings_init();
    memset(p, 0, sizeof(*p));
    memset(req, 0, sizeof(*req));
    p->req = req;
    p->limits = limits;
    p->body_limit = limits->max_body_bytes;
    req->body = evbuffer_new();
    llhttp_init(&p->ll, HTTP_REQUEST, &settings);
    p->ll.data = p;
    scan_reset(p);
}

void
gw_parser_free(gw_parser_t *p)
{
    gw_req_t *r = p->req;
    if (r == NULL)
        return;
    free(r->hbuf);
    free(r->headers);
    if (r->body)
        evbuffer_free(r->body);
    gw_path_free(&r->path);
    p->req = NULL;
}

void
gw_parser_set_body_limit(gw_parser_t *p, size_t limit)
{
    p->body_limit = limit;
}

int
gw_parser_resume(gw_parser_t *p)
{
    gw_req_t *r = p->req;
    if (r->content_length > 0 && (uint64_t)r->content_length > p->body_limit) {
        set_error(p, 413, "request body too large");
        return GW_ERR;
    }
    llhttp_resume(&p->ll);
    return GW_OK;
}

void
gw_parser_next(gw_parser_t *p)
{
    gw_req_t *r = p->req;
    llhttp_resume(&p->ll);
    r->hlen = 0;
    r->url_off = r->url_len = 0;
    r->path_off = r->path_len = 0;
    r->query_off = r->query_len = 0;
    r->nheaders = 0;
    r->keep_alive = r->expect_continue = r->has_body = r->chunked = false;
    r->content_length = 0;
    p->body_limit = p->limits->max_body_bytes;
    evbuffer_drain(r->body, evbuffer_get_length(r->body));
    r->body_len = 0;
    r->request_id[0] = '\0';
    r->client_ip[0] = '\0';
    r->peer_trust = 0;
    p->status = 0;
    p->reason = NULL;
    p->started = p->headers_done = p->in_field = false;
    p->nhost = 0;
    p->trailer_len = 0;
    scan_reset(p);
}

/*
 * Checks the header block (request line through the empty line) for what
 * llhttp tolerates: a LF without CR before it, a CR not followed by LF, and
 * obsolete line folding (a header line starting with SP or HTAB). Stops at
 * the end of the header block; the body is never scanned.
 */
static int
prescan(gw_parser_t *p, const char *data, size_t len)
{
    char prev = p->scan_prev;
    for (size_t i = 0; i < len && !p->scan_done; i++) {
        char b = data[i];
        if (b == '\n') {
            if (prev != '\r')
                return set_error(p, 400, "bare LF in request head");
            if (!p->scan_line_start) {
                p->scan_line_start = true;
                p->scan_first_line = false;
            } else if (!p->scan_first_line) {
                p->scan_done = true;
            }
        } else if (prev == '\r') {
            return set_error(p, 400, "CR not followed by LF in request head");
        } else if (b != '\r') {
            if (p->scan_line_start && !p->scan_first_line && (b == ' ' || b == '\t'))
                return set_error(p, 400, "obsolete line folding in request head");
            p->scan_line_start = false;
        }
        prev = b;
    }
    p->scan_prev = prev;
    return 0;
}

gw_parse_result_t
gw_parser_execute(gw_parser_t *p, const char *data, size_t len, size_t *consumed)
{
    *consumed = 0;
    if (p->status)
        return GW_PARSE_ERROR; /* a limit was exceeded at gw_parser_resume() */
    if (!p->scan_done && prescan(p, data, len) != 0)
        return GW_PARSE_ERROR;
    llhttp_errno_t err = llhttp_execute(&p->ll, data, len);
    if (err == HPE_OK) {
        *consumed = len;
        return GW_PARSE_AGAIN;
    }
    if (err == HPE_PAUSED) {
        *consumed = (size_t)(llhttp_get_error_pos(&p->ll) - data);
        if (p->paused_at_headers) {
            p->paused_at_headers = false;
            return GW_PARSE_HEADERS;
        }
        return GW_PARSE_DONE;
    }
    if (p->status == 0) {
        p->status = 400;
        p->reason = llhttp_get_error_reason(&p->ll);
        if (p->reason == NULL)
            p->reason = llhttp_errno_name(err);
    }
    return GW_PARSE_ERROR;
}

const char *
gw_req_header(const gw_req_t *r, const char *name, size_t *len)
{
    size_t nlen = strlen(name);
    for (size_t i = 0; i < r->nheaders; i++) {
        const gw_header_t *h = &r->headers[i];
        if (name_is(r, h, name, nlen)) {
            *len = h->value_len;
            return r->hbuf + h->value_off;
        }
    }
    return NULL;
}

bool
gw_http_idempotent(int method)
{
    return method == HTTP_GET || method == HTTP_HEAD || method == HTTP_PUT || method == HTTP_DELETE ||
           method == HTTP_OPTIONS || method == HTTP_TRACE;
}

const char *
gw_http_status_text(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 417: return "Expectation Failed";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
    }
}

const char *
gw_http_date(void)
{
    static __thread time_t last;
    static __thread char buf[32];
    time_t now = time(NULL);
    if (now != last) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(buf, sizeof(buf), "%a, %d %b %Y %H:%M:%S GMT", &tm);
        last = now;
    }
    return buf;
}

void
gw_http_new_request_id(char buf[33])
{
    static __thread uint64_t s[2];
    if (s[0] == 0 && s[1] == 0) {
        if (getrandom(s, sizeof(s), 0) != (ssize_t)sizeof(s) || (s[0] == 0 && s[1] == 0)) {
            s[0] = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)buf;
            s[1] = 0x9e3779b97f4a7c15ULL;
        }
    }
    static const char hex[] = "0123456789abcdef";
    for (int half = 0; half < 2; half++) {
        /* xorshift128+ */
        uint64_t x = s[0], y = s[1];
        s[0] = y;
        x ^= x << 23;
        s[1] = x ^ y ^ (x >> 17) ^ (y >> 26);
        uint64_t v = s[1] + y;
        for (int i = 0; i < 16; i++)
            buf[half * 16 + i] = hex[(v >> (i * 4)) & 15];
    }
    buf[32] = '\0';
}
