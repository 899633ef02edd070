/*
 * gw_tpool.h - a small process-wide pool of threads for bulk CPU work that
 * must not run on a worker's event loop: parsing a large backend answer,
 * building or freeing a large aggregate. nginx does the same with its
 * thread pools (for blocking file reads); gatherd's rule is that a worker's
 * loop never stalls for more than a few milliseconds.
 *
 * A worker hands a job to the pool with gw_tpool_post(); a pool thread runs
 * job->run(job); the job then goes back to the worker that posted it,
 * through that worker's port (an eventfd its loop watches), and
 * job->done(job) runs on the worker's thread. Every job comes back, done
 * or cancelled: the worker that posted it is the only one that frees it.
 *
 * Ownership: from gw_tpool_post() until done is called, the job and what
 * it owns belong to the pool; the worker touches none of it, except the
 * cancelled flag (gw_tpool_cancel). A cancelled job may skip its work or
 * stop early (run checks gw_tpool_cancelled); done then frees what the job
 * holds without using it. Whatever the job reads that it does not own
 * (configuration, for instance) must be kept alive by a reference the job
 * holds until done.
 *
 * The queue is one FIFO shared by all workers, under a mutex: a post and a
 * return cost a lock and at most one eventfd write each, small beside the
 * milliseconds of work a job is worth.
 */
#ifndef GW_TPOOL_H
#define GW_TPOOL_H

#include "gw_core.h"

struct event_base;

typedef struct gw_tjob_s gw_tjob_t;
typedef struct gw_tport_s gw_tport_t;

struct gw_tjob_s {
    void (*run)(gw_tjob_t *job);  /* on a pool thread */
    void (*done)(gw_tjob_t *job); /* back on the posting worker's thread; may free job */
    /* the pool's own */
    gw_tport_t *port;
    gw_tjob_t *next;
    bool cancelled; /* atomic */
};

/*
 * Starts threads pool threads (main thread, once, before any worker runs;
 * signals stay blocked in them as in the caller). A job waits in the queue
 * when all threads are busy; at most max_queue jobs wait (see
 * gw_tpool_post). GW_ERR with the reason in err.
 */
int gw_tpool_start(unsigned threads, unsigned max_queue, char *err, size_t errlen);

/* A reload's new queue limit (jobs already queued stay). Thread-safe. */
void gw_tpool_set_max_queue(unsigned max_queue);

/* The number of threads running (0 before gw_tpool_start). */
unsigned gw_tpool_threads(void);

/* Stops and joins the threads (main thread, after every worker freed its
 * port: no job is left). */
void gw_tpool_stop(void);

/*
 * Queues job (run and done set; the rest is the pool's) to come back
 * through port. GW_OK; GW_AGAIN when max_queue jobs wait already and force
 * is false (the job is untouched and still the caller's). Jobs that give
 * memory back or finish work already admitted are posted with force.
 * Worker thread of port only.
 */
int gw_tpool_post(gw_tport_t *port, gw_tjob_t *job, bool force);

/* Marks a posted job cancelled (worker thread); see above. */
static inline void
gw_tpool_cancel(gw_tjob_t *job)
{
    __atomic_store_n(&job->cancelled, true, __ATOMIC_RELAXED);
}

static inline bool
gw_tpool_cancelled(const gw_tjob_t *job)
{
    return __atomic_load_n(&job->cancelled, __ATOMIC_RELAXED);
}

/*
 * A worker's port: where its jobs come back, on base's loop. Made for each
 * worker by gw_server_start (main thread, before the worker runs). NULL
 * with errno set when its eventfd cannot be made.
 */
gw_tport_t *gw_tport_new(struct event_base *base);

/*
 * Jobs that come back through port without going through the pool: a
 * waiter of the cache (gw_cache.h), handed back by whichever thread ends
 * what it waits for. gw_tport_hold() (port's worker thread) counts one
 * such job as pending, so gw_tport_free() waits for it; gw_tport_return()
 * (any thread) hands it back (job->port and job->done set), and its done
 * runs on port's worker; gw_tport_unhold() (port's worker thread) forgets
 * one that will never come back.
 */
void gw_tport_hold(gw_tport_t *port);
void gw_tport_unhold(gw_tport_t *port);
void gw_tport_return(gw_tjob_t *job);

/* Jobs posted through port and not come back yet (worker thread). */
unsigned gw_tport_pending(const gw_tport_t *port);

/*
 * Waits for every job posted through port to come back, runs their done
 * callbacks (which may post more: those are waited for too), then frees
 * port. The worker's thread, after its loop ended and its requests were
 * cancelled; or the main thread for a worker that never ran.
 */
void gw_tport_free(gw_tport_t *port);

/* For /metrics. */
typedef struct {
    unsigned threads, max_queue;
    unsigned queued;   /* waiting for a thread */
    unsigned running;  /* being run */
    uint64_t jobs;     /* run, since start */
    uint64_t rejected; /* refused: the queue was full */
} gw_tpool_stats_t;
void gw_tpool_stats(gw_tpool_stats_t *out);

#endif
