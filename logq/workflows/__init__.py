"""logq.workflows: compose tasks (chains, groups, chords, DAGs) with
exactly-once joins, and run durable multi-step workflows.  The layer above
``logq.tasks``: it imports tasks, tasks never imports it (it plugs in
through ``App.extensions``, see ``_plugin``).

    from logq.workflows import chain, group, chord, depends_on, DAG, workflow

    h = chain(resize.s("a.jpg", 200), upload.s(), notify.s("ops")).delay()
    g = group(resize.s(p, 200) for p in paths).delay()          # GroupHandle
    c = chord((resize.s(p, 200) for p in paths), merge.s()).delay()
    r = depends_on(report.s(day), [h1, h2], allow_failure=True)

    @workflow(app)
    def onboard(ctx, user_id):
        acct = ctx.step(create_account, user_id)
        ctx.sleep(3600)
        ok = ctx.wait_event("email-confirmed", timeout=86400)
        ctx.step(send_welcome, acct, ok)
        return acct
    w = onboard.start(42, workflow_id="onboard-42")
    send_event(app, w.id, "email-confirmed", True); w.status(); w.result(timeout=...)

Joins: ``_joins`` (the promise and the records); durable workflows:
``_durable``; drawing them: ``_view``.
"""

from logq.workflows import _plugin  # noqa: F401  (registers the App extension)
from logq.workflows._canvas import (DAG, GraphHandle, GroupHandle, chain, chord, depends_on, group,
                                    handle)
from logq.workflows._durable import (NonDeterminismError, StepFailed, Workflow, WorkflowCancelled,
                                     WorkflowContext, WorkflowError, WorkflowFailed, WorkflowHandle,
                                     WorkflowStatus, get_workflow, send_event, workflow)
from logq.workflows._graph import GraphError
from logq.workflows._purge import purge

__all__ = ["chain", "group", "chord", "depends_on", "DAG", "GraphHandle", "GroupHandle", "handle",
           "GraphError", "workflow", "Workflow", "WorkflowContext", "WorkflowHandle", "WorkflowStatus",
           "send_event", "get_workflow", "WorkflowError", "NonDeterminismError", "StepFailed",
           "WorkflowFailed", "WorkflowCancelled", "purge"]
