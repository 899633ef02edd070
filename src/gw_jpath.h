/*
 * gw_jpath.h - dotted paths into JSON values, and the shaping operations
 * aggregate routes build on them: get, set, delete, allow (keep only the
 * listed paths) and deny (remove the listed paths).
 *
 * Syntax: "a.b.c", "items[0].id", "[2].name" (the root is an array),
 * "a.b[1][0]". A key is non-empty and may not contain ".", "[", "]", "{",
 * "}" or a control character; there is no quoting, so those keys cannot be
 * addressed. An index is a decimal number without leading zeros (0 itself is
 * fine) of at most 9 digits. The empty path means the whole value. At most
 * GW_JPATH_MAX_DEPTH steps. A key step only goes into an object and an index
 * step only into an array: "items.0" is the key "0", never an index, and
 * "[0]" on an object finds nothing.
 *
 * "[*]" (every element of an array) is only accepted by
 * gw_jpath_compile_wild(), for paths that select several values (a batch
 * call's "from"); gw_jpath_compile() refuses it, so every other path names
 * one value. gw_jpath_get() finds nothing through a "[*]" step: such a path
 * is read with gw_jpath_collect() or split with gw_jpath_split_wild().
 *
 * Sharing: allow and deny never modify their input. Their result is a new
 * reference that may share untouched subtrees with the input (jansson
 * reference counts, no copy), which is what makes them cheap on large
 * answers. Neither the input nor the result may then be mutated in place
 * (gw_jpath_set/gw_jpath_delete) while the other is alive, unless the caller
 * deep-copies first. In the aggregator the backend's parsed answer is
 * dropped right after shaping, so the result is the only owner.
 *
 * Compiled paths and selections are immutable: built at configuration load,
 * shared read-only by worker threads.
 */
#ifndef GW_JPATH_H
#define GW_JPATH_H

#include "gw_core.h"

#include <jansson.h>

#define GW_JPATH_MAX_DEPTH 32
#define GW_JPATH_MAX_INDEX 999999999UL

/*
 * Compiles src (NUL-terminated; "" or NULL is the whole value). Returns a
 * new path the caller frees with gw_jpath_free(), or NULL with a message in
 * err ("path \"a..b\": empty key at offset 2").
 */
gw_jpath_t *gw_jpath_compile(const char *src, char *err, size_t errlen);

/* As gw_jpath_compile(), and "[*]" is accepted as a step (any number). */
gw_jpath_t *gw_jpath_compile_wild(const char *src, char *err, size_t errlen);

/* The number of "[*]" steps of p. */
size_t gw_jpath_wildcards(const gw_jpath_t *p);

/*
 * Splits p at its first "[*]": *before is the path to the array, *after the
 * path from each element on (the empty path when "[*]" is last). Two new
 * paths the caller frees, with their text rebuilt ("a.b[0]"); GW_ERR (and
 * nothing made) when p has no "[*]".
 */
int gw_jpath_split_wild(const gw_jpath_t *p, gw_jpath_t **before, gw_jpath_t **after);

/*
 * Every value p selects in root, in document order, as a NEW array holding
 * references to them (borrowed from root: do not mutate either): "[*]"
 * steps go through every element of an array, a step that finds nothing
 * (or "[*]" on a non-array) contributes nothing. A path without "[*]" gives
 * [value] or [].
 */
json_t *gw_jpath_collect(const gw_jpath_t *p, const json_t *root);

/* Frees p (NULL is fine). */
void gw_jpath_free(gw_jpath_t *p);

/* The source text p was compiled from (borrowed, lives as long as p). */
const char *gw_jpath_text(const gw_jpath_t *p);

/* True for the empty path (the whole value). */
bool gw_jpath_is_root(const gw_jpath_t *p);

/*
 * The value at p inside root: a BORROWED reference (valid while root is),
 * root itself for the empty path. NULL when root is NULL, a step finds
 * nothing, or a step meets the wrong type (a key on a non-object, an index
 * on a non-array or past its end). A JSON null that is there is returned as
 * the null value, not NULL.
 */
json_t *gw_jpath_get(const gw_jpath_t *p, const json_t *root);

/*
 * Puts value at p inside root, in place. value is STOLEN (always, even on
 * failure, like jansson's *_new functions). Missing intermediate steps are
 * created: an object for a key step, an array for an index step. An index
 * may replace an element or append (index == size); a larger index, a step
 * through the wrong type or the empty path fail with GW_ERR, and then root
 * is left exactly as it was.
 */
int gw_jpath_set(json_t *root, const gw_jpath_t *p, json_t *value);

/*
 * A copy of root with the value at p replaced by value (STOLEN, always):
 * only the containers on the way are copied (shallow), everything else is
 * shared with root, which is not changed (see "Sharing" above). The empty
 * path gives value itself. NULL (value dropped) when a step of p finds
 * nothing in root: it replaces, it never creates.
 */
json_t *gw_jpath_replace(const json_t *root, const gw_jpath_t *p, json_t *value);

/* True when p is one key step ("product"): a key that allow, deny and
 * templates can name. */
bool gw_jpath_is_key(const gw_jpath_t *p);

/*
 * Removes the value at p from its parent, in place. Removing an array
 * element shifts the later ones down. Returns true when something was
 * removed; false when it was absent, the types did not fit, or p is the
 * empty path (the root cannot remove itself).
 */
bool gw_jpath_delete(json_t *root, const gw_jpath_t *p);

/*
 * A set of paths compiled into a tree for allow/deny, so that shaping
 * walks each answer once whatever the number of paths. The paths are copied
 * (the caller keeps and frees its own). Overlaps are resolved here: when
 * "a" and "a.b" are both listed, "a" wins.
 */
gw_jpath_sel_t *gw_jpath_sel_new(gw_jpath_t *const *paths, size_t n);
void gw_jpath_sel_free(gw_jpath_sel_t *sel);

/*
 * Keeps only the selected paths of root. Returns a NEW reference that may
 * share kept subtrees with root (see "Sharing" above):
 * - a kept path keeps its whole value; the containers on its way are
 *   rebuilt with only what leads to kept values: allow ["a.b"] on
 *   {"a":{"b":1,"c":2},"d":3} is {"a":{"b":1}};
 * - an object lists its kept keys in the order of the selection;
 * - array elements chosen by index keep their relative order and are
 *   packed: allow ["items[2]"] gives {"items":[<element 2>]};
 * - a container that ends up with nothing kept is left out, except the
 *   root, which becomes {} or [] (the same type as root);
 * - a root that is neither an object nor an array, with no empty path
 *   selected, has nothing that can be kept: NULL.
 */
json_t *gw_jpath_allow(const json_t *root, const gw_jpath_sel_t *sel);

/*
 * Removes the selected paths from root. Returns a NEW reference that may
 * share untouched subtrees with root (see "Sharing" above); only the
 * containers on the way to a removed value are copied (shallow). Absent
 * paths and paths through the wrong type are ignored. Indexes refer to
 * root's positions: deny ["a[0]", "a[1]"] removes the first two elements.
 * NULL when the empty path is selected (nothing is left).
 */
json_t *gw_jpath_deny(const json_t *root, const gw_jpath_sel_t *sel);

#endif
