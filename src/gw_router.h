/*
 * gw_router.h - maps a method and a normalized request path to a route.
 *
 * Patterns: literal segments, "{name}" segments and a trailing "*".
 * Precedence at every segment: exact beats parameter beats wildcard; a
 * less specific route is still tried when a more specific path has no route
 * for the method. A HEAD request is served by a GET route.
 *
 * Paths are normalized before matching (gw_router_normalize): split on '/',
 * empty segments dropped, each segment percent-decoded, "." dropped and ".."
 * removing the previous segment, so "/a/../b" and "/a/%2e%2e/b" are "/b" and
 * can never reach a route under the prefix "/a". A decoded "/" (%2F) stays inside its
 * segment and never creates a new one.
 *
 * The router is built once with the configuration and then read-only, so
 * worker threads share it without locks.
 */
#ifndef GW_ROUTER_H
#define GW_ROUTER_H

#include "gw_core.h"

#define GW_MAX_PARAMS 16

/* A normalized path: decoded segments stored back to back in buf. */
typedef struct {
    char *buf;
    size_t buf_cap;
    uint32_t *off;
    uint32_t *len;
    size_t nseg;
    size_t seg_cap;
} gw_path_t;

typedef enum { GW_ROUTE_FOUND, GW_ROUTE_NOT_FOUND, GW_ROUTE_BAD_METHOD } gw_route_result_t;

struct gw_match_s {
    gw_route_t *route;
    size_t nparams;
    struct {
        const char *name; /* borrowed from the router */
        const char *value; /* borrowed from the gw_path_t, not NUL-terminated */
        size_t len;
    } params[GW_MAX_PARAMS];
    size_t wildcard_seg; /* first segment matched by "*" (== nseg when empty) */
    bool has_wildcard;
    uint64_t allow; /* methods allowed on this path, for 405 */
    gw_route_t *path_route; /* 405: the first route of the path (metrics and the access log name it) */
};

gw_router_t *gw_router_new(void);
void gw_router_free(gw_router_t *r);

/*
 * Adds route (borrowed; must outlive the router) under pattern for methods.
 * GW_ERR with a message in err for a bad pattern or a duplicate.
 */
int gw_router_add(gw_router_t *r, const char *pattern, uint64_t methods, gw_route_t *route, char *err,
                  size_t errlen);

/* Matches method (llhttp number) and path; m is filled in. */
gw_route_result_t gw_router_match(const gw_router_t *r, int method, const gw_path_t *path, gw_match_t *m);

/*
 * Normalizes raw (the path part of a request target, without the query)
 * into out, reusing out's buffers. GW_ERR for an invalid escape, an encoded
 * NUL, or ".." above the root.
 */
int gw_router_normalize(const char *raw, size_t len, gw_path_t *out);
void gw_path_free(gw_path_t *p);

/* The value of hex digit c, or -1 (for percent-decoding). */
int gw_router_hexval(char c);

/* Writes "GET, HEAD, POST" for a method mask into buf. */
void gw_router_format_methods(uint64_t methods, char *buf, size_t len);

#endif
