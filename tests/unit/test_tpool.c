/* Unit tests for src/gw_tpool.c: jobs run on pool threads and come back to
 * the thread of the loop that posted them; the queue limit and force; a
 * cancelled job is seen as such by run; gw_tport_free() waits for the jobs
 * in flight and for those their done callbacks post again. No timings: the
 * pool threads are held at a gate the test opens. */
#include "gw_tpool.h"
#include "gw_test.h"

#include <event2/event.h>
#include <pthread.h>
#include <stdlib.h>

static pthread_mutex_t mtx = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static bool gate_open;
static unsigned started; /* runs that reached the gate */
static pthread_t main_thread;

typedef struct {
    gw_tjob_t job;
    bool ran_elsewhere, done_here;
    unsigned runs, dones, cancels; /* cancels: runs that saw the job cancelled */
    bool again; /* done posts it once more (a second trip) */
    unsigned *ndone;
} tjob_t;

static void
gate_set(bool open)
{
    pthread_mutex_lock(&mtx);
    gate_open = open;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mtx);
}

static void
wait_started(unsigned n)
{
    pthread_mutex_lock(&mtx);
    while (started < n)
        pthread_cond_wait(&cv, &mtx);
    pthread_mutex_unlock(&mtx);
}

static void
run(gw_tjob_t *j)
{
    tjob_t *t = (tjob_t *)j;
    pthread_mutex_lock(&mtx);
    started++;
    pthread_cond_broadcast(&cv);
    while (!gate_open)
        pthread_cond_wait(&cv, &mtx);
    pthread_mutex_unlock(&mtx);
    t->ran_elsewhere = !pthread_equal(pthread_self(), main_thread);
    t->cancels += gw_tpool_cancelled(j);
    t->runs++;
}

static void
done(gw_tjob_t *j)
{
    tjob_t *t = (tjob_t *)j;
    t->done_here = pthread_equal(pthread_self(), main_thread);
    t->dones++;
    (*t->ndone)++;
    if (t->again) {
        t->again = false;
        CHECK(gw_tpool_post(j->port, j, true) == GW_OK);
    }
}

static void
test_jobs_come_back_to_the_loop(void)
{
    char err[256];
    main_thread = pthread_self();
    started = 0;
    gate_set(false);
    CHECK(gw_tpool_start(2, 4, err, sizeof(err)) == GW_OK);
    CHECK(gw_tpool_threads() == 2);
    struct event_base *base = event_base_new();
    gw_tport_t *port = gw_tport_new(base);
    CHECK(port != NULL);
    unsigned ndone = 0;
    tjob_t jobs[8];
    memset(jobs, 0, sizeof(jobs));
    for (int i = 0; i < 8; i++) {
        jobs[i].job.run = run;
        jobs[i].job.done = done;
        jobs[i].ndone = &ndone;
    }
    /* two run (held at the gate), four wait: the queue is full */
    for (int i = 0; i < 2; i++)
        CHECK(gw_tpool_post(port, &jobs[i].job, false) == GW_OK);
    wait_started(2);
    for (int i = 2; i < 6; i++)
        CHECK(gw_tpool_post(port, &jobs[i].job, false) == GW_OK);
    CHECK(gw_tpool_post(port, &jobs[6].job, false) == GW_AGAIN);
    CHECK(gw_tpool_post(port, &jobs[6].job, true) == GW_OK); /* force passes the limit */
    gw_tpool_stats_t st;
    gw_tpool_stats(&st);
    CHECK(st.queued == 5 && st.running == 2 && st.rejected == 1 && st.max_queue == 4);
    CHECK(gw_tport_pending(port) == 7);
    gate_set(true);
    for (int turns = 0; ndone < 7 && turns < 10000; turns++)
        event_base_loop(base, EVLOOP_ONCE);
    CHECK(ndone == 7);
    CHECK(gw_tport_pending(port) == 0);
    for (int i = 0; i < 7; i++)
        CHECK(jobs[i].runs == 1 && jobs[i].dones == 1 && jobs[i].ran_elsewhere && jobs[i].done_here &&
              jobs[i].cancels == 0);
    CHECK(jobs[7].runs == 0);
    gw_tport_free(port);
    event_base_free(base);
    gw_tpool_stop();
    CHECK(gw_tpool_threads() == 0);
}

static void
test_cancel_and_free_waits(void)
{
    char err[256];
    main_thread = pthread_self();
    started = 0;
    gate_set(false);
    CHECK(gw_tpool_start(1, 8, err, sizeof(err)) == GW_OK);
    struct event_base *base = event_base_new();
    gw_tport_t *port = gw_tport_new(base);
    unsigned ndone = 0;
    tjob_t a, b;
    memset(&a, 0, sizeof(a));
    memset(&b, 0, sizeof(b));
    a.job.run = b.job.run = run;
    a.job.done = b.job.done = done;
    a.ndone = b.ndone = &ndone;
    a.again = true; /* comes back, goes out again, comes back */
    CHECK(gw_tpool_post(port, &a.job, false) == GW_OK);
    CHECK(gw_tpool_post(port, &b.job, false) == GW_OK);
    wait_started(1);
    gw_tpool_cancel(&a.job); /* while it runs */
    gw_tpool_cancel(&b.job); /* while it waits */
    gate_set(true);
    gw_tport_free(port); /* no loop turns: it waits, and runs the done callbacks itself */
    CHECK(ndone == 3);
    CHECK(a.runs == 2 && a.dones == 2 && a.cancels == 1); /* the second trip was posted anew */
    CHECK(b.runs == 1 && b.dones == 1 && b.cancels == 1);
    event_base_free(base);
    gw_tpool_stop();
}

TEST_MAIN(T(test_jobs_come_back_to_the_loop), T(test_cancel_and_free_waits))
