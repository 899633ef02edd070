/* Unit tests for src/gw_template.c: names, encoding contexts, injection
 * attempts, value conversion, compile errors, dependencies, JSON bodies.
 * The context is built the way the daemon builds it: a request parsed by
 * gw_parser and a route matched by gw_router. */
#include "gw_http.h"
#include "gw_router.h"
#include "gw_template.h"
#include "gw_test.h"

#include <llhttp.h>
#include <stdlib.h>

static const char REQUEST[] =
    "GET /users/42/files/r%C3%A9sum%C3%A9%2Fv1?q=hello+world&multi=1&multi=2&e=&crlf=%0d%0a&lf=%0a&dots=..&dot=."
    "&nul=%00&bad=%zz&enc=a%2Fb%3Fc%26d%3De%23f%25g&u=%C3%A9&ff=%FF&tab=%09&del=%7F&plus=%2B&a%20b=sp&a+c=pl"
    "&flag&num=7 HTTP/1.1\r\n"
    "Host: example.test\r\n"
    "X-Token: Bearer abc/def?x=1&y#z\r\n"
    "X-Uni: caf\xc3\xa9\r\n"
    "X-Latin: caf\xe9\r\n"
    "X-Empty:\r\n"
    "X-Dup: first\r\n"
    "x-dup: second\r\n"
    "\r\n";

static const char USER[] =
    "{\"id\":42,\"name\":\"Ann\",\"address\":{\"city\":\"Paris\"},\"big\":9223372036854775807,"
    "\"small\":-9223372036854775808,\"r1\":0.1,\"r2\":1e300,\"r3\":1.50,\"r4\":-0.0,\"r5\":0.30000000000000004,"
    "\"r6\":0.3333333333333333,\"r7\":5e-324,\"r8\":2.0,\"t\":true,\"f\":false,\"n\":null,\"obj\":{\"k\":1},"
    "\"arr\":[1],\"slash\":\"a/b\",\"dots\":\"..\",\"dot\":\".\",\"empty\":\"\",\"crlf\":\"a\\r\\nb\",\"pct\":\"%2F\","
    "\"nul\":\"a\\u0000b\",\"uni\":\"\\u65e5\\u672c\",\"sp\":\"a b+c\"}";
static const char ORDERS[] = "[{\"id\":\"o-1\",\"total\":10},{\"id\":\"o/2\",\"total\":2.5}]";
static const char ITEM[] = "{\"sku\":\"A B\",\"qty\":3}";

static const char *const PARAMS[] = { "id", "name" };
static const char *const CALLS[] = { "user", "orders", "none" };
static const gw_tpl_scope_t SCOPE = { PARAMS, 2, CALLS, 3, true, false };

static const gw_http_limits_t limits = {
    .max_header_bytes = 4096, .max_headers = 20, .max_url_bytes = 1024, .max_body_bytes = 64,
};

typedef struct {
    gw_parser_t parser;
    gw_req_t req;
    gw_router_t *router;
    gw_route_t route;
    gw_match_t match;
    json_t *results[3];
    json_t *item;
    gw_tpl_ctx_t ctx;
} fixture_t;

static fixture_t F;

static json_t *
J(const char *text)
{
    json_error_t e;
    json_t *v = json_loads(text, JSON_DECODE_ANY | JSON_ALLOW_NUL, &e);
    if (v == NULL)
        printf("    bad test JSON %s: %s\n", text, e.text);
    return v;
}

static void
setup(void)
{
    memset(&F, 0, sizeof(F));
    gw_parser_init(&F.parser, &F.req, &limits);
    size_t used = 0;
    gw_parse_result_t res = gw_parser_execute(&F.parser, REQUEST, sizeof(REQUEST) - 1, &used);
    if (res != GW_PARSE_DONE)
        printf("    fixture request not parsed: %d %s\n", res, F.parser.reason ? F.parser.reason : "");
    CHECK(res == GW_PARSE_DONE);
    F.router = gw_router_new();
    char err[256];
    F.route.where = "routes[0]";
    CHECK(gw_router_add(F.router, "/users/{id}/files/{name}", ~0ULL, &F.route, err, sizeof(err)) == GW_OK);
    CHECK(gw_router_match(F.router, HTTP_GET, &F.req.path, &F.match) == GW_ROUTE_FOUND);
    F.results[0] = J(USER);
    F.results[1] = J(ORDERS);
    F.results[2] = NULL; /* "none" has no answer */
    F.item = J(ITEM);
    F.ctx = (gw_tpl_ctx_t){ .req = &F.req, .match = &F.match, .results = F.results, .nresults = 3, .item = F.item };
}

static void
teardown(void)
{
    for (size_t i = 0; i < 3; i++)
        json_decref(F.results[i]);
    json_decref(F.item);
    gw_router_free(F.router);
    gw_parser_free(&F.parser);
}

/* Compiles and renders src; returns the text, "compile: MESSAGE" or
 * "CODE: DETAIL" (in a rotating static buffer). */
static const char *
R_ctx(gw_tpl_kind_t kind, const char *src, const gw_tpl_ctx_t *ctx)
{
    static char bufs[4][1024];
    static int k;
    char *b = bufs[k++ & 3];
    char err[512];
    gw_tpl_t *t = gw_tpl_compile(src, kind, &SCOPE, err, sizeof(err));
    if (t == NULL) {
        snprintf(b, sizeof(bufs[0]), "compile: %s", err);
        return b;
    }
    gw_tpl_buf_t out = { 0 };
    gw_tpl_err_t e = { 0 };
    if (gw_tpl_render(t, ctx, &out, &e) == GW_OK) {
        CHECK(strlen(out.data) == out.len || memchr(out.data, '\0', out.len) != NULL);
        snprintf(b, sizeof(bufs[0]), "%s", out.data);
    } else {
        CHECK(out.len == 0);
        snprintf(b, sizeof(bufs[0]), "%s: %s", gw_fail_name(e.code), e.detail);
    }
    gw_tpl_buf_free(&out);
    gw_tpl_free(t);
    return b;
}

#define TGT(src) R_ctx(GW_TPL_TARGET, src, &F.ctx)
#define HDR(src) R_ctx(GW_TPL_HEADER, src, &F.ctx)

static void
test_names(void)
{
    setup();
    CHECK_STR(TGT("/u/{id}"), "/u/42");
    /* a decoded path parameter ("résumé/v1", %2F inside its segment) is encoded again */
    CHECK_STR(TGT("/f/{name}"), "/f/r%C3%A9sum%C3%A9%2Fv1");
    CHECK_STR(HDR("{name}"), "r\xc3\xa9sum\xc3\xa9/v1");
    CHECK_STR(HDR("{query.q}"), "hello world");
    CHECK_STR(HDR("{query.multi}"), "1"); /* the first occurrence */
    CHECK_STR(HDR("{query.plus}"), "+");
    CHECK_STR(HDR("{query.a b}"), "sp"); /* keys are decoded too: a%20b */
    CHECK_STR(HDR("{query.a c}"), "pl"); /* and a+c */
    CHECK_STR(HDR("{query.flag}"), "");  /* present without "=" */
    CHECK_STR(HDR("{query.e}"), "");
    CHECK_STR(HDR("{query.num}"), "7");
    CHECK_STR(HDR("{query.missing}"), "missing_value: {query.missing}: no query parameter \"missing\" in the request");
    CHECK_STR(HDR("{query.bad}"), "invalid_value: {query.bad}: bad percent-escape in the query parameter");
    CHECK_STR(HDR("{header.x-token}"), "Bearer abc/def?x=1&y#z");
    CHECK_STR(HDR("{header.X-TOKEN}"), "Bearer abc/def?x=1&y#z");
    CHECK_STR(HDR("{header.x-dup}"), "first");
    CHECK_STR(HDR("[{header.X-Empty}]"), "[]");
    CHECK_STR(HDR("{header.x-none}"), "missing_value: {header.x-none}: no header \"x-none\" in the request");
    CHECK_STR(HDR("{user.id}"), "42");
    CHECK_STR(HDR("{user.address.city}"), "Paris");
    CHECK_STR(HDR("{orders[1].id}"), "o/2");
    CHECK_STR(HDR("{orders[0].total}"), "10");
    CHECK_STR(HDR("{item.sku}"), "A B");
    CHECK_STR(HDR("{item.qty}"), "3");
    CHECK_STR(HDR("{user.zip}"), "missing_value: {user.zip}: missing in the answer of call user");
    CHECK_STR(HDR("{orders[5].id}"), "missing_value: {orders[5].id}: missing in the answer of call orders");
    CHECK_STR(HDR("{user.n}"), "missing_value: {user.n}: null in the answer of call user");
    CHECK_STR(HDR("{none.id}"), "missing_value: {none.id}: call none has no answer");
    CHECK_STR(HDR("{none}"), "missing_value: {none}: call none has no answer");
    CHECK_STR(HDR("{item.zz}"), "missing_value: {item.zz}: missing in the foreach item");
    CHECK_STR(HDR("{user}"), "invalid_value: {user}: an object cannot be used as text");
    CHECK_STR(HDR("{orders}"), "invalid_value: {orders}: an array cannot be used as text");
    CHECK_STR(HDR("{user.obj}"), "invalid_value: {user.obj}: an object cannot be used as text");
    CHECK_STR(HDR("{user.arr}"), "invalid_value: {user.arr}: an array cannot be used as text");
    /* a whole answer that is a scalar is fine as text */
    json_t *saved = F.results[1];
    F.results[1] = json_string("just text");
    CHECK_STR(HDR("{orders}"), "just text");
    json_decref(F.results[1]);
    F.results[1] = saved;

    /* no request, no match, no results, no item: all missing, never a crash */
    gw_tpl_ctx_t empty = { 0 };
    CHECK_STR(R_ctx(GW_TPL_HEADER, "{id}", &empty), "missing_value: {id}: no path parameter \"id\" in this match");
    CHECK_STR(R_ctx(GW_TPL_HEADER, "{query.q}", &empty),
              "missing_value: {query.q}: no query parameter \"q\" in the request");
    CHECK_STR(R_ctx(GW_TPL_HEADER, "{header.host}", &empty),
              "missing_value: {header.host}: no header \"host\" in the request");
    CHECK_STR(R_ctx(GW_TPL_HEADER, "{user.id}", &empty), "missing_value: {user.id}: call user has no answer");
    CHECK_STR(R_ctx(GW_TPL_HEADER, "{item}", &empty), "missing_value: {item}: no foreach item");
    teardown();
}

static void
test_target_encoding(void)
{
    setup();
    CHECK_STR(TGT("/search?q={query.q}&n={query.num}"), "/search?q=hello%20world&n=7");
    /* every delimiter in a value is encoded: no new segment, parameter, fragment or line */
    CHECK_STR(TGT("/a/{query.enc}"), "/a/a%2Fb%3Fc%26d%3De%23f%25g");
    CHECK_STR(TGT("/a?x={query.enc}&y=1"), "/a?x=a%2Fb%3Fc%26d%3De%23f%25g&y=1");
    CHECK_STR(TGT("/a/{header.x-token}"), "/a/Bearer%20abc%2Fdef%3Fx%3D1%26y%23z");
    CHECK_STR(TGT("/a/{user.slash}"), "/a/a%2Fb");
    CHECK_STR(TGT("/a/{user.pct}"), "/a/%252F"); /* an escape in a value is text, never decoded */
    CHECK_STR(TGT("/a/{user.crlf}"), "/a/a%0D%0Ab");
    CHECK_STR(TGT("/a?x={query.crlf}"), "/a?x=%0D%0A");
    CHECK_STR(TGT("/a/{query.plus}"), "/a/%2B");
    CHECK_STR(TGT("/a/{user.sp}"), "/a/a%20b%2Bc");
    CHECK_STR(TGT("/a/{query.u}"), "/a/%C3%A9");
    CHECK_STR(TGT("/a/{user.uni}"), "/a/%E6%97%A5%E6%9C%AC");
    CHECK_STR(TGT("/a/{query.tab}"), "/a/%09");
    CHECK_STR(TGT("/a/{query.ff}"), "/a/%FF");
    CHECK_STR(TGT("/a/{item.sku}-{item.qty}.json"), "/a/A%20B-3.json");
    CHECK_STR(TGT("/a/-._~{user.name}"), "/a/-._~Ann");
    /* literal text of the template is kept as written */
    CHECK_STR(TGT("/a%2Fb/{id}?x=1&y=%20&z=[]"), "/a%2Fb/42?x=1&y=%20&z=[]");

    /* the path context: empty, "." and ".." would change the path */
    CHECK_STR(TGT("/a/{query.dots}/b"), "invalid_value: {query.dots}: the value \"..\" would change the path");
    CHECK_STR(TGT("/a/{user.dots}"), "invalid_value: {user.dots}: the value \"..\" would change the path");
    CHECK_STR(TGT("/a/{query.dot}"), "invalid_value: {query.dot}: the value \".\" would change the path");
    CHECK_STR(TGT("/a/{query.e}/b"), "invalid_value: {query.e}: empty value in the path");
    CHECK_STR(TGT("/a/x{user.empty}"), "invalid_value: {user.empty}: empty value in the path");
    CHECK_STR(TGT("/a/{query.flag}"), "invalid_value: {query.flag}: empty value in the path");
    /* ... whatever text surrounds the value (a literal "." and a "." value
     * would make ".."); longer runs of dots are ordinary names */
    CHECK_STR(TGT("/a/.{query.dot}/b"), "invalid_value: {query.dot}: the value \".\" would change the path");
    CHECK_STR(TGT("/a/{query.dot}.?x=1"), "invalid_value: {query.dot}: the value \".\" would change the path");
    CHECK_STR(TGT("/a/{user.dots}.{user.name}"), "invalid_value: {user.dots}: the value \"..\" would change the path");
    CHECK_STR(TGT("/a/..{user.name}"), "/a/..Ann");
    CHECK_STR(TGT("/a/.{user.name}"), "/a/.Ann");
    /* the query context: empty and dots are ordinary values */
    CHECK_STR(TGT("/a?x={query.e}&y={query.dots}&z={query.dot}"), "/a?x=&y=..&z=.");
    /* the first literal "?" starts the query; a "?" in a value never does */
    CHECK_STR(TGT("/a/{query.enc}?{query.dots}"), "/a/a%2Fb%3Fc%26d%3De%23f%25g?..");
    /* a NUL byte is refused in both contexts */
    CHECK_STR(TGT("/a/{query.nul}"), "invalid_value: {query.nul}: the value holds a NUL byte");
    CHECK_STR(TGT("/a?x={user.nul}"), "invalid_value: {user.nul}: the value holds a NUL byte");
    teardown();
}

static void
test_header_values(void)
{
    setup();
    CHECK_STR(HDR("Bearer {query.q}"), "Bearer hello world");
    CHECK_STR(HDR("{query.enc}"), "a/b?c&d=e#f%g"); /* no encoding in a header */
    CHECK_STR(HDR("{header.x-uni}"), "caf\xc3\xa9");
    CHECK_STR(HDR("{user.uni}"), "\xe6\x97\xa5\xe6\x9c\xac");
    CHECK_STR(HDR("{query.crlf}"), "invalid_value: {query.crlf}: control character in a header value");
    CHECK_STR(HDR("x{query.lf}"), "invalid_value: {query.lf}: control character in a header value");
    CHECK_STR(HDR("{user.crlf}"), "invalid_value: {user.crlf}: control character in a header value");
    CHECK_STR(HDR("{query.tab}"), "invalid_value: {query.tab}: control character in a header value");
    CHECK_STR(HDR("{query.del}"), "invalid_value: {query.del}: control character in a header value");
    CHECK_STR(HDR("{query.nul}"), "invalid_value: {query.nul}: control character in a header value");
    CHECK_STR(HDR("{user.nul}"), "invalid_value: {user.nul}: control character in a header value");
    teardown();
}

static void
test_values(void)
{
    setup();
    CHECK_STR(HDR("{user.big}"), "9223372036854775807");
    CHECK_STR(HDR("{user.small}"), "-9223372036854775808");
    CHECK_STR(HDR("{user.r1}"), "0.1");
    CHECK_STR(HDR("{user.r2}"), "1e+300");
    CHECK_STR(HDR("{user.r3}"), "1.5");
    CHECK_STR(HDR("{user.r4}"), "-0");
    CHECK_STR(HDR("{user.r5}"), "0.30000000000000004"); /* needs 17 digits */
    CHECK_STR(HDR("{user.r6}"), "0.3333333333333333");  /* 16 */
    CHECK_STR(HDR("{user.r7}"), "4.94065645841247e-324");
    CHECK_STR(HDR("{user.r8}"), "2");
    CHECK_STR(TGT("/n/{user.r2}"), "/n/1e%2B300");
    CHECK_STR(TGT("/n/{user.small}"), "/n/-9223372036854775808");
    CHECK_STR(HDR("{user.t},{user.f}"), "true,false");
    /* missing never becomes "" or "null" */
    CHECK_STR(TGT("/a/{user.n}"), "missing_value: {user.n}: null in the answer of call user");
    CHECK_STR(TGT("/a?x={user.n}"), "missing_value: {user.n}: null in the answer of call user");
    CHECK_STR(TGT("/a?x={user.nope}"), "missing_value: {user.nope}: missing in the answer of call user");
    teardown();
}

static void
test_braces(void)
{
    setup();
    CHECK_STR(HDR("{{literal}} {id}"), "{literal} 42");
    CHECK_STR(HDR("a{{b"), "a{b");
    CHECK_STR(HDR("}}"), "}");
    CHECK_STR(HDR("{{{id}}}"), "{42}");
    CHECK_STR(HDR(""), "");
    CHECK_STR(HDR("plain"), "plain");
    CHECK_STR(TGT("/a/{{x}}"), "compile: a character that URLs do not allow is not allowed in a target (offset 3; "
                               "percent-encode it as %7B)");
    teardown();
}

static void
expect_compile_error(gw_tpl_kind_t kind, const char *src, const char *msg)
{
    char err[512] = "";
    gw_tpl_t *t = gw_tpl_compile(src, kind, &SCOPE, err, sizeof(err));
    if (t != NULL)
        printf("    template \"%s\" was accepted\n", src);
    CHECK(t == NULL);
    CHECK_CONTAINS(err, msg);
    gw_tpl_free(t);
}

static void
test_compile_errors(void)
{
    expect_compile_error(GW_TPL_HEADER, "{usr.id}",
                         "unknown name \"usr\" in \"{usr.id}\": not a path parameter, a call, query.*, header.* or "
                         "item");
    expect_compile_error(GW_TPL_HEADER, "{ID}", "unknown name \"ID\"");
    expect_compile_error(GW_TPL_HEADER, "x{id", "unclosed \"{\" at offset 1");
    expect_compile_error(GW_TPL_HEADER, "x}y", "\"}\" without \"{\" at offset 1");
    expect_compile_error(GW_TPL_HEADER, "{a{id}}", "\"{\" inside a placeholder at offset 2");
    expect_compile_error(GW_TPL_HEADER, "{}", "empty placeholder");
    expect_compile_error(GW_TPL_HEADER, "{.id}", "\"{.id}\": a placeholder starts with a name");
    expect_compile_error(GW_TPL_HEADER, "{[0]}", "a placeholder starts with a name");
    expect_compile_error(GW_TPL_HEADER, "{query}", "\"{query}\": query needs a name, as in {query.NAME}");
    expect_compile_error(GW_TPL_HEADER, "{query.}", "query needs a name");
    expect_compile_error(GW_TPL_HEADER, "{query[0]}", "query needs a name");
    expect_compile_error(GW_TPL_HEADER, "{header}", "header needs a name");
    expect_compile_error(GW_TPL_HEADER, "{header.x y}", "\"x y\" is not a valid header name");
    expect_compile_error(GW_TPL_HEADER, "{header.a:b}", "\"a:b\" is not a valid header name");
    expect_compile_error(GW_TPL_HEADER, "{id.x}", "path parameter id is text and has no fields");
    expect_compile_error(GW_TPL_HEADER, "{id[0]}", "path parameter id is text and has no fields");
    expect_compile_error(GW_TPL_HEADER, "{user.a..b}", "\"{user.a..b}\": path \"a..b\": empty key at offset 2");
    expect_compile_error(GW_TPL_HEADER, "{user.}", "\"{user.}\": empty key after \".\"");
    expect_compile_error(GW_TPL_HEADER, "{user..a}", "empty key after \".\"");
    expect_compile_error(GW_TPL_HEADER, "{user.[0]}", "empty key after \".\"");
    expect_compile_error(GW_TPL_HEADER, "{orders[01]}", "no leading zeros");
    expect_compile_error(GW_TPL_HEADER, "{orders[x]}", "decimal number");
    expect_compile_error(GW_TPL_HEADER, "a\r\nX-Evil: 1", "a control character is not allowed in a header value");
    expect_compile_error(GW_TPL_TARGET, "", "a target must start with \"/\"");
    expect_compile_error(GW_TPL_TARGET, "{id}/x", "a target must start with \"/\"");
    expect_compile_error(GW_TPL_TARGET, "http://evil/x", "a target must start with \"/\"");
    expect_compile_error(GW_TPL_TARGET, "/a b", "a space is not allowed in a target (offset 2; percent-encode it as "
                                                "%20)");
    expect_compile_error(GW_TPL_TARGET, "/a#frag", "\"#\" (a target has no fragment)");
    expect_compile_error(GW_TPL_TARGET, "/a\r\nHost: x", "a control character is not allowed in a target");
    expect_compile_error(GW_TPL_TARGET, "/a\x7f", "a control character is not allowed in a target");
    expect_compile_error(GW_TPL_TARGET, "/caf\xc3\xa9", "a non-ASCII byte is not allowed in a target");
    expect_compile_error(GW_TPL_TARGET, "/a%zz", "a \"%\" that does not start a %XX escape");
    expect_compile_error(GW_TPL_TARGET, "/a%2", "a \"%\" that does not start a %XX escape");
    expect_compile_error(GW_TPL_TARGET, "/a\"b", "a character that URLs do not allow");
    expect_compile_error(GW_TPL_TARGET, "/a|b", "a character that URLs do not allow");

    /* item only in a foreach call */
    gw_tpl_scope_t no_item = SCOPE;
    no_item.has_item = false;
    char err[512];
    CHECK(gw_tpl_compile("{item.x}", GW_TPL_HEADER, &no_item, err, sizeof(err)) == NULL);
    CHECK_CONTAINS(err, "\"{item.x}\": item exists only in a call with \"foreach\"");

    /* ambiguous and reserved names */
    static const char *const params[] = { "user", "query", "x" };
    static const char *const calls[] = { "user", "item", "x" };
    gw_tpl_scope_t amb = { params, 3, calls, 3, true, false };
    CHECK(gw_tpl_compile("{user.id}", GW_TPL_HEADER, &amb, err, sizeof(err)) == NULL);
    CHECK_CONTAINS(err, "\"{user.id}\" is ambiguous: \"user\" is both a path parameter and a call: rename one");
    CHECK(gw_tpl_compile("{query.a}", GW_TPL_HEADER, &amb, err, sizeof(err)) == NULL);
    CHECK_CONTAINS(err, "\"query\" is reserved and is also the name of a path parameter: rename the path parameter");
    CHECK(gw_tpl_compile("{item}", GW_TPL_HEADER, &amb, err, sizeof(err)) == NULL);
    CHECK_CONTAINS(err, "\"item\" is reserved and is also the name of a call: rename the call");

    /* a NULL or empty scope knows only query.* and header.* */
    gw_tpl_scope_t none = { 0 };
    gw_tpl_t *t = gw_tpl_compile("{query.a}{header.b}", GW_TPL_HEADER, &none, err, sizeof(err));
    CHECK(t != NULL);
    gw_tpl_free(t);
    CHECK(gw_tpl_compile("{id}", GW_TPL_HEADER, &none, err, sizeof(err)) == NULL);
}

static uint64_t
deps_of(const gw_tpl_scope_t *scope, const char *src)
{
    char err[512];
    gw_tpl_t *t = gw_tpl_compile(src, GW_TPL_TARGET, scope, err, sizeof(err));
    if (t == NULL) {
        printf("    %s: %s\n", src, err);
        return ~0ULL;
    }
    uint64_t d = gw_tpl_deps(t);
    CHECK_STR(gw_tpl_source(t), src);
    gw_tpl_free(t);
    return d;
}

static void
test_deps(void)
{
    CHECK(deps_of(&SCOPE, "/a") == 0);
    CHECK(deps_of(&SCOPE, "/a/{id}?q={query.q}") == 0);
    CHECK(deps_of(&SCOPE, "/a/{user.id}") == 1);
    CHECK(deps_of(&SCOPE, "/a/{orders[0].id}") == 2);
    CHECK(deps_of(&SCOPE, "/a/{user.id}/{orders[0].id}?x={user.name}") == 3);
    CHECK(deps_of(&SCOPE, "/a/{none}") == 4);
    /* 70 calls: the first 64 can be referred to, bit i for call i */
    static char names[70][16];
    const char *calls[70];
    for (int i = 0; i < 70; i++) {
        snprintf(names[i], sizeof(names[i]), "c%d", i);
        calls[i] = names[i];
    }
    gw_tpl_scope_t big = { NULL, 0, calls, 70, false, false };
    CHECK(deps_of(&big, "/{c63.x}/{c0}") == ((1ULL << 63) | 1));
    char err[512];
    CHECK(gw_tpl_compile("/{c64}", GW_TPL_TARGET, &big, err, sizeof(err)) == NULL);
    CHECK_CONTAINS(err, "call c64 is call number 65; templates can refer to the first 64 calls only");
}

static void
test_limits(void)
{
    setup();
    char err[256];
    gw_tpl_t *t = gw_tpl_compile("/a/{user.name}/{query.enc}", GW_TPL_TARGET, &SCOPE, err, sizeof(err));
    CHECK(t != NULL);
    /* appends to what the buffer holds; a failure leaves it as it was */
    gw_tpl_buf_t b = { .limit = 50 };
    gw_tpl_err_t e;
    CHECK(gw_tpl_render(t, &F.ctx, &b, &e) == GW_OK);
    CHECK_STR(b.data, "/a/Ann/a%2Fb%3Fc%26d%3De%23f%25g");
    size_t len = b.len;
    CHECK(gw_tpl_render(t, &F.ctx, &b, &e) == GW_ERR);
    CHECK(e.code == GW_FAIL_INVALID_VALUE);
    CHECK_CONTAINS(e.detail, "{query.enc}: the result would be longer than 50 bytes");
    CHECK(b.len == len);
    CHECK_STR(b.data, "/a/Ann/a%2Fb%3Fc%26d%3De%23f%25g");
    b.len = 0;
    CHECK(gw_tpl_render(t, &F.ctx, &b, &e) == GW_OK && b.len == len);
    gw_tpl_buf_free(&b);
    /* the default limit */
    gw_tpl_buf_t big = { 0 };
    for (int i = 0; i < 2000; i++)
        CHECK(gw_tpl_render(t, &F.ctx, &big, &e) == GW_OK || big.len + len > GW_TPL_MAX_LEN);
    CHECK(big.len <= GW_TPL_MAX_LEN && big.len + len > GW_TPL_MAX_LEN);
    gw_tpl_buf_free(&big);
    gw_tpl_free(t);
    teardown();
}

/* Compiles the JSON body text and renders it: the compact result,
 * "compile: MESSAGE" or "CODE: DETAIL". */
static const char *
B(const char *body)
{
    static char bufs[4][2048];
    static int k;
    char *b = bufs[k++ & 3];
    char err[512];
    json_t *in = J(body);
    gw_tpl_json_t *t = gw_tpl_json_compile(in, &SCOPE, err, sizeof(err));
    json_decref(in);
    if (t == NULL) {
        snprintf(b, sizeof(bufs[0]), "compile: %s", err);
        return b;
    }
    gw_tpl_err_t e = { 0 };
    json_t *out = gw_tpl_json_render(t, &F.ctx, &e);
    if (out != NULL) {
        size_t n = json_dumpb(out, b, sizeof(bufs[0]) - 1, JSON_COMPACT | JSON_ENCODE_ANY);
        b[GW_MIN(n, sizeof(bufs[0]) - 1)] = '\0';
    } else {
        snprintf(b, sizeof(bufs[0]), "%s: %s", gw_fail_name(e.code), e.detail);
    }
    json_decref(out);
    gw_tpl_json_free(t);
    return b;
}

static void
test_json_body(void)
{
    setup();
    /* one placeholder: the value itself, with its type */
    CHECK_STR(B("{\"uid\":\"{user.id}\"}"), "{\"uid\":42}");
    CHECK_STR(B("{\"v\":[\"{user.big}\",\"{user.r1}\",\"{user.t}\",\"{user.address}\"]}"),
              "{\"v\":[9223372036854775807,0.10000000000000001,true,{\"city\":\"Paris\"}]}");
    CHECK_STR(B("{\"all\":\"{orders}\"}"),
              "{\"all\":[{\"id\":\"o-1\",\"total\":10},{\"id\":\"o/2\",\"total\":2.5}]}");
    CHECK_STR(B("\"{item}\""), "{\"sku\":\"A B\",\"qty\":3}");
    CHECK_STR(B("{\"n\":\"{user.n}\"}"), "{\"n\":null}"); /* a present null stays null */
    CHECK_STR(B("{\"id\":\"{id}\",\"q\":\"{query.num}\",\"h\":\"{header.x-token}\"}"),
              "{\"id\":\"42\",\"q\":\"7\",\"h\":\"Bearer abc/def?x=1&y#z\"}");
    /* mixed text: a string; no encoding (JSON escaping applies) */
    CHECK_STR(B("{\"msg\":\"Hello {user.name}, {user.id} {query.crlf}!\"}"),
              "{\"msg\":\"Hello Ann, 42 \\r\\n!\"}");
    CHECK_STR(B("{\"m\":\"{user.r2}/{user.t}/{query.enc}\"}"), "{\"m\":\"1e+300/true/a/b?c&d=e#f%g\"}");
    CHECK_STR(B("{\"m\":\"{{literal}} {user.name}\"}"), "{\"m\":\"{literal} Ann\"}");
    CHECK_STR(B("{\"m\":\"nul {user.nul}\"}"), "{\"m\":\"nul a\\u0000b\"}");
    /* constants are copied, braces unescaped */
    CHECK_STR(B("{\"k\":[1,2.5,true,null,{\"x\":\"{{y}}\"}],\"s\":\"plain\",\"e\":\"\"}"),
              "{\"k\":[1,2.5,true,null,{\"x\":\"{y}\"}],\"s\":\"plain\",\"e\":\"\"}");
    CHECK_STR(B("{\"a\":{\"b\":[{\"c\":\"{item.qty}\"},3]}}"), "{\"a\":{\"b\":[{\"c\":3},3]}}");
    /* object keys are not templated */
    CHECK_STR(B("{\"{id}\":1}"), "{\"{id}\":1}");
    /* failures */
    CHECK_STR(B("{\"a\":\"{user.zip}\"}"), "missing_value: {user.zip}: missing in the answer of call user");
    CHECK_STR(B("{\"a\":\"{none}\"}"), "missing_value: {none}: call none has no answer");
    CHECK_STR(B("{\"a\":\"x {user.n}\"}"), "missing_value: {user.n}: null in the answer of call user");
    CHECK_STR(B("{\"a\":\"x {user.obj}\"}"), "invalid_value: {user.obj}: an object cannot be used as text");
    CHECK_STR(B("[\"{query.ff}\"]"), "invalid_value: {query.ff}: the value is not valid UTF-8");
    CHECK_STR(B("[\"x{query.ff}\"]"), "invalid_value: {query.ff}: the value is not valid UTF-8");
    CHECK_STR(B("[\"{header.x-latin}\"]"), "invalid_value: {header.x-latin}: the value is not valid UTF-8");
    CHECK_STR(B("[\"{query.u}\"]"), "[\"\xc3\xa9\"]");
    CHECK_STR(B("[\"{query.bad}\"]"), "invalid_value: {query.bad}: bad percent-escape in the query parameter");
    /* compile errors name the place in the body */
    CHECK_STR(B("{\"items\":[1,{\"name\":\"{usr.id}\"}]}"),
              "compile: items[1].name: unknown name \"usr\" in \"{usr.id}\": not a path parameter, a call, query.*, "
              "header.* or item");
    CHECK_STR(B("\"{oops\""), "compile: unclosed \"{\" at offset 0 (write \"{{\" for a literal brace)");
    CHECK_STR(B("[[\"}\"]]"), "compile: [0][0]: \"}\" without \"{\" at offset 0 (write \"}}\" for a literal brace)");

    /* dependencies are the union of all strings */
    char err[256];
    json_t *in = J("{\"a\":\"{orders[0].id}\",\"b\":[\"x {none.y}\"],\"c\":\"{id}\"}");
    gw_tpl_json_t *t = gw_tpl_json_compile(in, &SCOPE, err, sizeof(err));
    CHECK(t != NULL && gw_tpl_json_deps(t) == 6);
    gw_tpl_json_free(t);
    json_decref(in);

    /* two renders share nothing constant; values from answers are shared */
    in = J("{\"k\":{\"c\":[1]},\"u\":\"{user.address}\"}");
    t = gw_tpl_json_compile(in, &SCOPE, err, sizeof(err));
    gw_tpl_err_t e;
    json_t *r1 = gw_tpl_json_render(t, &F.ctx, &e), *r2 = gw_tpl_json_render(t, &F.ctx, &e);
    CHECK(r1 != NULL && r2 != NULL);
    CHECK(json_object_get(r1, "k") != json_object_get(r2, "k"));
    CHECK(json_object_get(r1, "u") == json_object_get(F.results[0], "address"));
    json_decref(r1);
    json_decref(r2);
    gw_tpl_json_free(t);
    /* the config tree can go right after compiling */
    json_decref(in);
    CHECK(gw_tpl_json_compile(NULL, &SCOPE, err, sizeof(err)) == NULL);
    CHECK_STR(err, "no body to compile");
    teardown();
}

TEST_MAIN(T(test_names), T(test_target_encoding), T(test_header_values), T(test_values), T(test_braces),
          T(test_compile_errors), T(test_deps), T(test_limits), T(test_json_body))
