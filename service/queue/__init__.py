"""The reply-job queue: `manager` is the only code that touches the `reply_job` table;
`worker` claims and runs jobs; `notify` wakes workers in other processes (PostgreSQL)."""
