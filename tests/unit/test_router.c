/* Unit tests for src/gw_router.c: patterns, precedence, 405, normalization. */
#include "gw_config.h"
#include "gw_router.h"
#include "gw_test.h"

#include <llhttp.h>
#include <stdlib.h>

#define GET (1ULL << HTTP_GET)
#define POST (1ULL << HTTP_POST)

static gw_route_t routes[16];

static gw_router_t *
build(const char *const *patterns, const uint64_t *methods, size_t n)
{
    gw_router_t *r = gw_router_new();
    char err[256];
    for (size_t i = 0; i < n; i++) {
        routes[i].where = (char *)patterns[i];
        int rc = gw_router_add(r, patterns[i], methods[i], &routes[i], err, sizeof(err));
        if (rc != GW_OK)
            printf("    add %s: %s\n", patterns[i], err);
        CHECK(rc == GW_OK);
    }
    return r;
}

static gw_route_result_t
match(gw_router_t *r, int method, const char *path, gw_match_t *m)
{
    gw_path_t p = { 0 };
    static gw_path_t keep; /* params point into it; freed by the next call */
    gw_path_free(&keep);
    if (gw_router_normalize(path, strlen(path), &p) != GW_OK) {
        gw_path_free(&p);
        return (gw_route_result_t)-1;
    }
    gw_route_result_t res = gw_router_match(r, method, &p, m);
    keep = p;
    return res;
}

static void
test_precedence(void)
{
    const char *pats[] = { "/users/me", "/users/{id}", "/users/*", "/", "/users/{id}/orders" };
    uint64_t ms[] = { ~0ULL, ~0ULL, ~0ULL, ~0ULL, GET };
    gw_router_t *r = build(pats, ms, 5);
    gw_match_t m;
    CHECK(match(r, HTTP_GET, "/users/me", &m) == GW_ROUTE_FOUND && m.route == &routes[0]);
    CHECK(match(r, HTTP_GET, "/users/42", &m) == GW_ROUTE_FOUND && m.route == &routes[1]);
    CHECK(m.nparams == 1 && m.params[0].len == 2 && memcmp(m.params[0].value, "42", 2) == 0);
    CHECK_STR(m.params[0].name, "id");
    CHECK(match(r, HTTP_GET, "/users/42/x/y", &m) == GW_ROUTE_FOUND && m.route == &routes[2]);
    CHECK(m.has_wildcard && m.wildcard_seg == 1);
    CHECK(match(r, HTTP_GET, "/users/42/orders", &m) == GW_ROUTE_FOUND && m.route == &routes[4]);
    /* wildcard also matches the bare prefix */
    CHECK(match(r, HTTP_GET, "/users", &m) == GW_ROUTE_FOUND && m.route == &routes[2]);
    CHECK(match(r, HTTP_GET, "/", &m) == GW_ROUTE_FOUND && m.route == &routes[3]);
    CHECK(match(r, HTTP_GET, "/other", &m) == GW_ROUTE_NOT_FOUND);
    /* POST on /users/42/orders: the exact-shaped GET route does not take it,
     * the wildcard route does */
    CHECK(match(r, HTTP_POST, "/users/42/orders", &m) == GW_ROUTE_FOUND && m.route == &routes[2]);
    gw_router_free(r);
}

static void
test_methods_and_405(void)
{
    const char *pats[] = { "/items", "/items", "/items/{id}" };
    uint64_t ms[] = { GET, POST, GET };
    gw_router_t *r = build(pats, ms, 3);
    gw_match_t m;
    CHECK(match(r, HTTP_GET, "/items", &m) == GW_ROUTE_FOUND && m.route == &routes[0]);
    CHECK(match(r, HTTP_POST, "/items", &m) == GW_ROUTE_FOUND && m.route == &routes[1]);
    CHECK(match(r, HTTP_HEAD, "/items/7", &m) == GW_ROUTE_FOUND && m.route == &routes[2]);
    CHECK(match(r, HTTP_DELETE, "/items", &m) == GW_ROUTE_BAD_METHOD);
    char allow[128];
    gw_router_format_methods(m.allow, allow, sizeof(allow));
    CHECK_STR(allow, "GET, HEAD, POST");
    CHECK(match(r, HTTP_PUT, "/items/7", &m) == GW_ROUTE_BAD_METHOD);
    gw_router_format_methods(m.allow, allow, sizeof(allow));
    CHECK_STR(allow, "GET, HEAD");
    gw_router_free(r);
}

static void
test_bad_patterns(void)
{
    static const char *const bad[] = { "users", "/a//b", "/a/*/b", "/{id", "/a{id}", "/{}", "/{a-b}",
                                       "/{id}/{id}", "/a b", "/a/%41", "/a/../b", "/a/./b" };
    char err[256];
    for (size_t i = 0; i < GW_NELEM(bad); i++) {
        gw_router_t *r = gw_router_new();
        gw_route_t route = { .where = "t" };
        int rc = gw_router_add(r, bad[i], GET, &route, err, sizeof(err));
        if (rc != GW_ERR)
            printf("    pattern %s was accepted\n", bad[i]);
        CHECK(rc == GW_ERR);
        gw_router_free(r);
    }
}

static void
test_duplicates(void)
{
    gw_router_t *r = gw_router_new();
    gw_route_t a = { .where = "routes[0]" }, b = { .where = "routes[1]" };
    char err[256];
    CHECK(gw_router_add(r, "/u/{id}", GET | POST, &a, err, sizeof(err)) == GW_OK);
    /* same shape, different parameter name: still the same route */
    CHECK(gw_router_add(r, "/u/{uid}", POST, &b, err, sizeof(err)) == GW_ERR);
    CHECK_CONTAINS(err, "duplicate route: POST /u/{uid} is already defined by routes[0]");
    CHECK(gw_router_add(r, "/u/{uid}/", 1ULL << HTTP_DELETE, &b, err, sizeof(err)) == GW_OK);
    gw_router_free(r);
}

static void
check_norm(const char *raw, const char *expect)
{
    gw_path_t p = { 0 };
    int rc = gw_router_normalize(raw, strlen(raw), &p);
    char out[256] = "";
    if (rc == GW_OK) {
        size_t w = 0;
        for (size_t i = 0; i < p.nseg && w + p.len[i] + 2 < sizeof(out); i++) {
            out[w++] = '/';
            memcpy(out + w, p.buf + p.off[i], p.len[i]);
            w += p.len[i];
        }
        out[w] = '\0';
        if (w == 0)
            snprintf(out, sizeof(out), "/");
    }
    if (expect == NULL) {
        if (rc != GW_ERR)
            printf("    %s normalized to %s, expected an error\n", raw, out);
        CHECK(rc == GW_ERR);
    } else {
        CHECK(rc == GW_OK);
        CHECK_STR(out, expect);
    }
    gw_path_free(&p);
}

static void
test_normalize(void)
{
    check_norm("/", "/");
    check_norm("//a///b/", "/a/b");
    check_norm("/a/./b", "/a/b");
    check_norm("/a/../b", "/b");
    check_norm("/a/%2e%2e/b", "/b");
    check_norm("/a/%2E%2e/%2e/b", "/b");
    check_norm("/public/../admin", "/admin");
    check_norm("/a%2Fb/c", "/a/b/c"); /* shown joined; a%2Fb is ONE segment, see below */
    check_norm("/caf%C3%A9", "/caf\xc3\xa9");
    check_norm("/..", NULL);
    check_norm("/a/../..", NULL);
    check_norm("/%2e%2e/etc", NULL);
    check_norm("/a%00b", NULL);
    check_norm("/a%zz", NULL);
    check_norm("/a%2", NULL);
    gw_path_t p = { 0 };
    CHECK(gw_router_normalize("/a%2Fb/c", 8, &p) == GW_OK);
    CHECK(p.nseg == 2 && p.len[0] == 3 && memcmp(p.buf + p.off[0], "a/b", 3) == 0);
    gw_path_free(&p);
}

static void
test_encoded_slash_cannot_escape(void)
{
    const char *pats[] = { "/public/*", "/admin" };
    uint64_t ms[] = { GET, GET };
    gw_router_t *r = build(pats, ms, 2);
    gw_match_t m;
    CHECK(match(r, HTTP_GET, "/public/../admin", &m) == GW_ROUTE_FOUND && m.route == &routes[1]);
    CHECK(match(r, HTTP_GET, "/public/%2e%2e/admin", &m) == GW_ROUTE_FOUND && m.route == &routes[1]);
    CHECK(match(r, HTTP_GET, "/public/..%2Fadmin", &m) == GW_ROUTE_FOUND && m.route == &routes[0]);
    CHECK(match(r, HTTP_GET, "/public/a%2Fb", &m) == GW_ROUTE_FOUND && m.route == &routes[0]);
    gw_router_free(r);
}

TEST_MAIN(T(test_precedence), T(test_methods_and_405), T(test_bad_patterns), T(test_duplicates), T(test_normalize),
          T(test_encoded_slash_cannot_escape))
