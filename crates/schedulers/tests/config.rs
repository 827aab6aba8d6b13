//! Config reading (diffusers' `ConfigMixin` rules) and the errors for bad configs and bad calls.

use autopipe_rng::Generator;
use autopipe_schedulers::{
    from_config, BetaSchedule, DDIMScheduler, DPMSolverMultistepScheduler, Error,
    EulerDiscreteScheduler, PredictionType, Scheduler, TimestepSpacing, SUPPORTED,
};
use serde_json::json;
use tch::{Device, Kind, Tensor};

fn err(class: &str, config: serde_json::Value) -> Error {
    match from_config(class, &config) {
        Ok(_) => panic!("{class} accepted {config}"),
        Err(e) => e,
    }
}

#[test]
fn unknown_scheduler_lists_the_supported_ones() {
    let e = err("KDPM2DiscreteScheduler", json!({}));
    assert!(
        matches!(&e, Error::UnknownScheduler(name) if name == "KDPM2DiscreteScheduler"),
        "{e}"
    );
    let message = e.to_string();
    for name in SUPPORTED {
        assert!(message.contains(name), "{message} does not list {name}");
    }
}

#[test]
fn every_supported_scheduler_builds_from_an_empty_config() {
    for name in SUPPORTED {
        let mut s = from_config(name, &json!({})).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.class_name(), *name);
        s.set_timesteps(10).unwrap();
        assert!(!s.timesteps().is_empty(), "{name}");
    }
}

#[test]
fn defaults_follow_each_class_signature() {
    let ddim = from_config("DDIMScheduler", &json!({})).unwrap();
    assert_eq!(ddim.config().timestep_spacing, TimestepSpacing::Leading);
    let euler = from_config("EulerDiscreteScheduler", &json!({})).unwrap();
    assert_eq!(euler.config().timestep_spacing, TimestepSpacing::Linspace);
    assert_eq!(euler.config().num_train_timesteps, 1000);
    assert_eq!(euler.config().beta_schedule, BetaSchedule::Linear);
    assert_eq!(euler.config().prediction_type, PredictionType::Epsilon);
    assert!(
        DDIMScheduler::from_config(&json!({}))
            .unwrap()
            .options()
            .clip_sample
    );
}

#[test]
fn unknown_private_and_null_keys_are_ignored() {
    // A PNDM config swapped to Euler, as diffusers stores it: PNDM-only keys, `_` keys and nulls.
    let config = json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "skip_prk_steps": true,
        "set_alpha_to_one": false,
        "trained_betas": null,
        "sigma_min": null,
        "some_future_option": [1, 2, 3],
    });
    let s = EulerDiscreteScheduler::from_config(&config).unwrap();
    assert_eq!(s.config().beta_schedule, BetaSchedule::ScaledLinear);
    assert_eq!(s.config().beta_start, 0.00085);
    assert_eq!(s.options().sigmas.sigma_min, None);
}

#[test]
fn use_default_values_keys_take_the_class_default() {
    let config = json!({
        "beta_schedule": "scaled_linear",
        "timestep_spacing": "trailing",
        "_use_default_values": ["timestep_spacing"],
    });
    let s = from_config("EulerDiscreteScheduler", &config).unwrap();
    assert_eq!(s.config().beta_schedule, BetaSchedule::ScaledLinear);
    assert_eq!(s.config().timestep_spacing, TimestepSpacing::Linspace);
}

#[test]
fn bad_values_are_config_errors() {
    let cases = [
        ("DDIMScheduler", json!({"beta_schedule": "cubic"})),
        (
            "EulerDiscreteScheduler",
            json!({"prediction_type": "flow_prediction"}),
        ),
        ("PNDMScheduler", json!({"num_train_timesteps": "many"})),
        (
            "LMSDiscreteScheduler",
            json!({"timestep_spacing": "sideways"}),
        ),
        ("DDPMScheduler", json!({"variance_type": "huge"})),
        ("DDIMScheduler", json!({"num_train_timesteps": 0})),
        ("DDIMScheduler", json!([1, 2])),
        (
            "EulerDiscreteScheduler",
            json!({"use_karras_sigmas": true, "use_exponential_sigmas": true}),
        ),
    ];
    for (class, config) in cases {
        let e = err(class, config.clone());
        assert!(matches!(e, Error::Config { .. }), "{class} {config}: {e}");
    }
}

#[test]
fn unimplemented_options_are_rejected() {
    let cases = [
        ("DDIMScheduler", json!({"beta_schedule": "sigmoid"})),
        ("EulerDiscreteScheduler", json!({"use_beta_sigmas": true})),
        (
            "DPMSolverMultistepScheduler",
            json!({"algorithm_type": "dpmsolver"}),
        ),
        (
            "DPMSolverMultistepScheduler",
            json!({"use_lu_lambdas": true}),
        ),
        (
            "DPMSolverMultistepScheduler",
            json!({"use_flow_sigmas": true}),
        ),
        ("DPMSolverMultistepScheduler", json!({"solver_order": 4})),
        ("PNDMScheduler", json!({"prediction_type": "sample"})),
        (
            "DDIMScheduler",
            json!({"prediction_type": "original_sample"}),
        ),
    ];
    for (class, config) in cases {
        let e = err(class, config.clone());
        assert!(
            matches!(e, Error::Unsupported { .. }),
            "{class} {config}: {e}"
        );
    }
}

#[test]
fn bad_calls_are_errors_not_panics() {
    let mut g = Generator::new(0);
    let x = Tensor::zeros([1, 4, 2, 2], (Kind::Float, Device::Cpu));

    let mut ddim = from_config("DDIMScheduler", &json!({})).unwrap();
    assert!(matches!(
        ddim.step(&x, 981.0, &x, &mut g),
        Err(Error::TimestepsNotSet(_))
    ));
    assert!(matches!(
        ddim.set_timesteps(0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        ddim.set_timesteps(1001),
        Err(Error::InvalidArgument { .. })
    ));
    ddim.set_timesteps(10).unwrap();
    assert!(matches!(
        ddim.step(&x, 5000.0, &x, &mut g),
        Err(Error::TimestepNotInSchedule { .. })
    ));
    let wrong_shape = Tensor::zeros([1, 3, 2, 2], (Kind::Float, Device::Cpu));
    assert!(matches!(
        ddim.step(&wrong_shape, 901.0, &x, &mut g),
        Err(Error::InvalidArgument { .. })
    ));

    let mut euler = from_config("EulerDiscreteScheduler", &json!({})).unwrap();
    euler.set_timesteps(10).unwrap();
    // An off-schedule timestep leaves the input unscaled and makes `step` fail.
    let scaled = euler.scale_model_input(&x, 123.25);
    assert_eq!(scaled.size(), x.size());
    assert!(matches!(
        euler.step(&x, 123.25, &x, &mut g),
        Err(Error::TimestepNotInSchedule { .. })
    ));

    let mut dpm = from_config("DPMSolverMultistepScheduler", &json!({})).unwrap();
    dpm.set_timesteps(5).unwrap();
    let timesteps = dpm.timesteps().to_vec();
    let mut latents = x.shallow_clone();
    for &t in &timesteps {
        latents = dpm.step(&latents, t, &latents, &mut g).unwrap();
    }
    // One step past the end of the schedule.
    assert!(dpm.step(&latents, timesteps[4], &latents, &mut g).is_err());
}

#[test]
fn set_timesteps_resets_the_step_index() {
    let mut g = Generator::new(0);
    let x = Tensor::ones([1, 4, 2, 2], (Kind::Float, Device::Cpu));
    let mut s = from_config("EulerDiscreteScheduler", &json!({})).unwrap();
    s.set_timesteps(4).unwrap();
    let first_t = s.timesteps()[0];
    let first = s.scale_model_input(&x, first_t);
    for t in s.timesteps().to_vec() {
        let input = s.scale_model_input(&x, t);
        let _ = s.step(&input, t, &x, &mut g).unwrap();
    }
    s.set_timesteps(4).unwrap();
    let again = s.scale_model_input(&x, first_t);
    assert_eq!((first - again).abs().max().double_value(&[]), 0.0);
}

#[test]
fn ddim_eta_is_only_accepted_by_ddim() {
    for name in SUPPORTED {
        let s = from_config(name, &json!({})).unwrap();
        assert_eq!(s.accepts_eta(), *name == "DDIMScheduler", "{name}");
    }
}

#[test]
fn python_written_non_finite_values_reach_the_config() {
    // DPMSolverMultistepScheduler.save_config() writes its default lambda_min_clipped as Python's
    // json does: a bare -Infinity. searchsorted(flip(lambda_t), -inf) clips nothing.
    let config = |clip: &str| {
        autopipe_json::parse(&format!(
            r#"{{"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "squaredcos_cap_v2",
                "lambda_min_clipped": {clip}, "timestep_spacing": "linspace"}}"#
        ))
        .unwrap()
    };
    let unclipped = DPMSolverMultistepScheduler::from_config(&config("-Infinity")).unwrap();
    assert_eq!(unclipped.options().lambda_min_clipped, f64::NEG_INFINITY);
    let mut s = from_config("DPMSolverMultistepScheduler", &config("-Infinity")).unwrap();
    s.set_timesteps(10).unwrap();
    assert_eq!(
        s.timesteps(),
        [999.0, 899.0, 799.0, 699.0, 599.0, 500.0, 400.0, 300.0, 200.0, 100.0]
    );
    // A finite clip, for contrast: the cosine schedule's log-SNR falls below -5.1 near the end.
    let mut clipped = from_config("DPMSolverMultistepScheduler", &config("-5.1")).unwrap();
    clipped.set_timesteps(10).unwrap();
    assert!(clipped.timesteps()[0] < 999.0, "{:?}", clipped.timesteps());
}
