//! Opening the store: sled and its trees, the write-ahead log's replay, the key filter, the
//! checkpoint thread and the live byte count.

use super::*;

impl Inner {
    /// Opens the database at `opts.path` (see [`SledStore::open`]).
    pub(super) fn open(
        opts: &SledOptions,
        live: Arc<LiveOwners<(StoreKey, sled::IVec)>>,
        watchers: Arc<Watchers>,
        clock: Arc<dyn Clock>,
        hook: &reopen::Hook,
    ) -> Result<Self, StoreError> {
        disk_sync::create_private_dir(&opts.path).map_err(backend_err)?;
        let db = sled::Config::new()
            .path(&opts.path)
            .cache_capacity(opts.cache_capacity)
            // Checkpoints are the only flushes (see `checkpoint`).
            .flush_every_ms(None)
            .open()?;
        let meta = db.open_tree("meta")?;
        let fresh = meta.get("schema")?.is_none();
        match meta.get("schema")? {
            None => {
                meta.insert("schema", &[crate::store::record::SCHEMA_VERSION])?;
            }
            Some(v) if v.as_ref() == [crate::store::record::SCHEMA_VERSION] => {}
            Some(v) => {
                return Err(backend_err(std::io::Error::other(format!(
                    "{} was written by an unknown schema version {:?}",
                    opts.path.display(),
                    v.as_ref()
                ))))
            }
        }
        let records = db.open_tree("records")?;
        // Data dirs of earlier builds kept an expiry index; the sweeper's walk replaced it.
        if db.tree_names().iter().any(|n| n.as_ref() == b"expiry") {
            db.drop_tree("expiry")?;
        }
        let chunks = db.open_tree("chunks")?;
        // The log's entries after the last checkpoint, applied again (a crash, a power cut).
        let rec = recover::recover(&opts.path, &meta, &records, &chunks)?;
        chunks::drop_orphans(&records, &chunks)?;
        let size = Size::open(&meta, &records, fresh, opts.max_size)?;
        let block = db.generate_id()?.max(rec.block + 1);
        // Everything replayed (and the saved count's removal) is durable before the log is reused.
        meta.insert(checkpoint::APPLIED, &(rec.next - 1).to_be_bytes())?;
        db.flush()?;
        disk_sync::make_private(&opts.path).map_err(backend_err)?;
        let disk = DiskSync::open(&opts.path).map_err(backend_err)?;
        let every = (opts.sync == SyncPolicy::Periodic).then_some(opts.periodic_flush);
        let claims = Arc::clone(&live);
        let signal = Arc::new(CheckpointSignal::default());
        let wal = Arc::new(
            Wal::start(
                rec.pool,
                rec.next,
                every,
                Box::new(move || claims.len()),
                Arc::clone(&signal),
                hook.callback(),
            )
            .map_err(backend_err)?,
        );
        // Claims of this block are acknowledged only after this entry is synced (it comes first).
        wal.append(&Entry::TokenBlock(block));
        let block_mark = Arc::new(AtomicU64::new(block));
        let overlay = Arc::new(Overlay::default());
        let filter = KeyFilter::open(&records, &overlay);
        let checkpointer = Checkpointer::start(
            Arc::new(Parts {
                db: db.clone(),
                meta: meta.clone(),
                disk: Mutex::new(disk),
                wal: Arc::clone(&wal),
                overlay: Arc::clone(&overlay),
                records: records.clone(),
                block: Arc::clone(&block_mark),
                since: AtomicU64::new(0),
            }),
            signal,
            hook.callback(),
        )
        .map_err(backend_err)?;
        Ok(Inner {
            db,
            meta,
            records,
            chunks,
            assembled: SharedBytes::default(),
            walk: Mutex::new(Walk {
                batch: SWEEP_BATCH,
                ..Walk::default()
            }),
            wal,
            checkpointer,
            overlay,
            filter,
            sync: opts.sync,
            live,
            unflushed: Mutex::default(),
            tokens: Mutex::new(Tokens { block, used: 0 }),
            block: block_mark,
            size,
            space: SpaceGuard::new(opts.path.clone()),
            watchers,
            clock,
        })
    }
}
