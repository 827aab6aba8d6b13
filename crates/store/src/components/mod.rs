//! The component classes this store loads and the methods `Invoke` runs on them: an open registry.
//!
//! Each class declares itself in one place, its own file: the diffusers/transformers class name,
//! how it loads, and its methods with the named tensors each takes and returns
//! ([`ComponentClass`]). [`CLASSES`] lists them. The supported classes, the methods and the input
//! names that errors report, and the checks before a method runs, all come from those declarations.
//! Adding a class (T5EncoderModel, VQModel, …) is one file here and one line in
//! [`CLASSES`].

mod autoencoder_kl;
mod clip_text;
mod clip_vision;
mod controlnet;
mod if_safety_checker;
mod if_watermarker;
mod multilingual_clip;
mod prior_transformer;
mod safety_checker;
mod t5;
mod unet;
mod vq_model;

use crate::{Code, StoreError, Tensors};
use std::collections::HashSet;
use std::fmt::Display;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Every class this store loads.
const CLASSES: &[Class] = &[
    Class::of::<clip_text::CLIPTextModel>(),
    Class::of::<clip_text::CLIPTextModelWithProjection>(),
    Class::of::<unet::UNet2DConditionModel>(),
    Class::of::<controlnet::ControlNetModel>(),
    Class::of::<autoencoder_kl::AutoencoderKL>(),
    Class::of::<clip_vision::CLIPVisionModelWithProjection>(),
    Class::of::<prior_transformer::PriorTransformer>(),
    Class::of::<vq_model::VQModel>(),
    Class::of::<t5::T5EncoderModel>(),
    Class::of::<safety_checker::StableDiffusionSafetyChecker>(),
    Class::of::<multilingual_clip::MultilingualCLIP>(),
    Class::of::<if_safety_checker::IFSafetyChecker>(),
    Class::of::<if_watermarker::IFWatermarker>(),
];

/// A component class the store loads: what `model_index.json` calls it, how it loads, and what
/// `Invoke` can call on it.
///
/// A loaded component is immutable and shared by concurrent calls: methods only read its parameter
/// tensors and allocate new ones, which libtorch supports from several threads at once (the same
/// guarantee PyTorch relies on for multi-threaded inference). A model type holding `tch::Tensor`s
/// is therefore `Sync` by an `unsafe impl` beside its declaration (`Tensor` is not `Sync` only
/// because it wraps a raw pointer).
pub(crate) trait ComponentClass: Sized + Send + Sync + 'static {
    /// The diffusers/transformers class name, e.g. `UNet2DConditionModel`.
    const NAME: &'static str;
    /// The methods `Invoke` can call.
    const METHODS: &'static [Method<Self>];
    /// The methods whose calls the store may join into one call along dim 0 (see `batch`): every
    /// input is per row or one value for all rows, every output per row, and a row's output
    /// depends on its own inputs only.
    const BATCHED: &'static [&'static str] = &[];
    /// Loads a component folder (`config.json`, weights of `variant`) onto `device` in `kind`.
    fn load(
        dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, autopipe_models::Error>;
}

/// A method of a component class and the named tensors it takes and returns.
pub(crate) struct Method<C> {
    pub name: &'static str,
    /// Inputs it needs.
    pub required: &'static [&'static str],
    /// Inputs it also takes.
    pub optional: &'static [&'static str],
    /// Outputs it may return.
    pub outputs: &'static [&'static str],
    /// Runs the method on inputs whose names were checked against the lists above.
    pub run: fn(&C, &Inputs<'_>) -> Result<Tensors, StoreError>,
}

/// A registered class, its type erased.
pub(crate) struct Class {
    name: &'static str,
    load: Loader,
}

/// [`ComponentClass::load`] behind a `dyn Component`.
type Loader = fn(&Path, Option<&str>, Kind, Device) -> Result<Box<dyn Component>, StoreError>;

impl Class {
    const fn of<C: ComponentClass>() -> Self {
        Self {
            name: C::NAME,
            load: load_boxed::<C>,
        }
    }

    /// Loads a component folder as this class onto `device` in `kind`.
    pub fn load(
        &self,
        dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Box<dyn Component>, StoreError> {
        (self.load)(dir, variant, kind, device)
    }
}

fn load_boxed<C: ComponentClass>(
    dir: &Path,
    variant: Option<&str>,
    kind: Kind,
    device: Device,
) -> Result<Box<dyn Component>, StoreError> {
    Ok(Box::new(
        C::load(dir, variant, kind, device).map_err(model_error)?,
    ))
}

/// The registered class named `class_name`.
pub(crate) fn find(class_name: &str) -> Option<&'static Class> {
    CLASSES.iter().find(|c| c.name == class_name)
}

/// The registered class names, for messages: `CLIPTextModel, …, AutoencoderKL`.
pub(crate) fn supported() -> String {
    CLASSES
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A store error for a model failure: a bad config or weights is the checkpoint's fault, a bad
/// input the caller's.
fn model_error(e: autopipe_models::Error) -> StoreError {
    use autopipe_models::Error as E;
    let code = match &e {
        E::Config(_) | E::Weights(_) => Code::FailedPrecondition,
        E::Input(_) => Code::InvalidArgument,
        E::Io(io) if io.kind() == std::io::ErrorKind::NotFound => Code::NotFound,
        // Running out of device memory is a resource limit, not a bug: say so rather than INTERNAL.
        E::Torch(t) if t.to_string().to_ascii_lowercase().contains("out of memory") => {
            Code::ResourceExhausted
        }
        _ => Code::Internal,
    };
    StoreError::new(code, e.to_string())
}

/// A loaded component whose methods the store runs.
pub(crate) trait Component: Send + Sync {
    /// Runs `method` on named inputs, checking the names against its declaration first and turning
    /// libtorch failures into statuses.
    fn invoke(&self, method: &str, inputs: &Tensors) -> Result<Tensors, StoreError>;
    /// Whether calls of `method` may be joined (`ComponentClass::BATCHED`).
    fn batched(&self, method: &str) -> bool;
}

impl<C: ComponentClass> Component for C {
    fn batched(&self, method: &str) -> bool {
        C::BATCHED.contains(&method)
    }

    fn invoke(&self, method: &str, tensors: &Tensors) -> Result<Tensors, StoreError> {
        let mut seen = HashSet::new();
        if let Some((name, _)) = tensors.iter().find(|(n, _)| !seen.insert(n.as_str())) {
            return Err(StoreError::new(
                Code::InvalidArgument,
                format!("inputs.{name}: given more than once"),
            ));
        }
        let m = C::METHODS
            .iter()
            .find(|m| m.name == method)
            .ok_or_else(|| {
                let methods: Vec<&str> = C::METHODS.iter().map(|m| m.name).collect();
                StoreError::new(
                    Code::InvalidArgument,
                    format!(
                        "method: {} has no method {method:?} (methods: {})",
                        C::NAME,
                        methods.join(", ")
                    ),
                )
            })?;
        let inputs = Inputs {
            class: C::NAME,
            method: m.name,
            tensors,
        };
        let accepted: Vec<&str> = m.required.iter().chain(m.optional).copied().collect();
        if let Some((name, _)) = tensors
            .iter()
            .find(|(n, _)| !accepted.contains(&n.as_str()))
        {
            return Err(inputs.invalid(
                name,
                format_args!("takes no input {name:?} (inputs: {})", accepted.join(", ")),
            ));
        }
        for name in m.required {
            inputs.required(name)?;
        }
        let outputs = inputs.guarded(|| (m.run)(self, &inputs))?;
        if let Some((name, _)) = outputs
            .iter()
            .find(|(n, _)| !m.outputs.contains(&n.as_str()))
        {
            return Err(StoreError::new(
                Code::Internal,
                format!(
                    "{}.{} returned {name:?}, which it does not declare",
                    C::NAME,
                    m.name
                ),
            ));
        }
        Ok(outputs)
    }
}

/// The named inputs of one call, for its method's body.
pub(crate) struct Inputs<'a> {
    class: &'static str,
    method: &'static str,
    tensors: &'a Tensors,
}

impl<'a> Inputs<'a> {
    /// An input the method takes, if given.
    pub fn optional(&self, name: &str) -> Option<&'a Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// An input the method needs.
    pub fn required(&self, name: &str) -> Result<&'a Tensor, StoreError> {
        self.optional(name)
            .ok_or_else(|| self.invalid(name, "requires it"))
    }

    /// An input the method needs, with `rank` dimensions.
    pub fn with_rank(&self, name: &str, rank: usize) -> Result<&'a Tensor, StoreError> {
        let t = self.required(name)?;
        if t.dim() != rank {
            return Err(self.invalid(
                name,
                format_args!("needs {rank} dimensions, got shape {:?}", t.size()),
            ));
        }
        Ok(t)
    }

    /// Runs a method body without autograd, turning libtorch failures into statuses.
    fn guarded(
        &self,
        run: impl FnOnce() -> Result<Tensors, StoreError>,
    ) -> Result<Tensors, StoreError> {
        let _guard = tch::no_grad_guard();
        // libtorch reports shape errors by exception; tch turns most into Err, a few paths panic.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "component panicked".into());
                Err(StoreError::new(Code::Internal, msg))
            });
        // Names and ranks were checked, so a kernel rejecting the tensors means their sizes do not
        // fit this component's weights: the caller's inputs, not the store, are at fault.
        result.map_err(|e| match e.code {
            Code::Internal | Code::InvalidArgument if !e.message.starts_with("inputs") => {
                StoreError::new(
                    Code::InvalidArgument,
                    format!(
                        "inputs: {}.{} rejected them: {}",
                        self.class, self.method, e.message
                    ),
                )
            }
            _ => e,
        })
    }

    /// INVALID_ARGUMENT for input `name`: `inputs.<name>: <class>.<method> <problem>`.
    pub fn invalid(&self, name: &str, problem: impl Display) -> StoreError {
        StoreError::new(
            Code::InvalidArgument,
            format!("inputs.{name}: {}.{} {problem}", self.class, self.method),
        )
    }
}

/// Moves a floating-point input to the model's device and dtype.
fn float_input(t: &Tensor, kind: Kind, device: Device) -> Tensor {
    if t.kind() == kind && t.device() == device {
        t.shallow_clone()
    } else {
        t.to_device(device).to_kind(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A class declared like the real ones, without weights.
    struct Echo;

    impl ComponentClass for Echo {
        const NAME: &'static str = "Echo";
        const METHODS: &'static [Method<Self>] = &[
            Method {
                name: "echo",
                required: &["x"],
                optional: &["y"],
                outputs: &["x"],
                run: |_, inputs| {
                    Ok(vec![(
                        "x".into(),
                        inputs.with_rank("x", 1)?.shallow_clone(),
                    )])
                },
            },
            Method {
                name: "undeclared",
                required: &[],
                optional: &[],
                outputs: &[],
                run: |_, _| Ok(vec![("secret".into(), Tensor::zeros([1], FLOAT))]),
            },
            Method {
                name: "kernel",
                required: &["x"],
                optional: &[],
                outputs: &["x"],
                run: |_, inputs| {
                    let x = inputs.required("x")?;
                    Ok(vec![(
                        "x".into(),
                        x.f_view([3])
                            .map_err(|e| StoreError::new(Code::Internal, e.to_string()))?,
                    )])
                },
            },
        ];

        fn load(
            _dir: &Path,
            _variant: Option<&str>,
            _kind: Kind,
            _device: Device,
        ) -> Result<Self, autopipe_models::Error> {
            Ok(Echo)
        }
    }

    const FLOAT: (Kind, Device) = (Kind::Float, Device::Cpu);

    fn call(method: &str, names: &[&str]) -> Result<Tensors, StoreError> {
        let inputs = names
            .iter()
            .map(|n| (n.to_string(), Tensor::zeros([2], FLOAT)))
            .collect();
        Echo.invoke(method, &inputs)
    }

    fn message(r: Result<Tensors, StoreError>, code: Code) -> String {
        let e = r.expect_err("an error");
        assert_eq!(e.code, code, "{e}");
        e.message
    }

    #[test]
    fn the_registry_lists_every_class_once() {
        assert_eq!(
            supported(),
            "CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel, ControlNetModel, \
             AutoencoderKL, CLIPVisionModelWithProjection, PriorTransformer, VQModel, T5EncoderModel, \
             StableDiffusionSafetyChecker, MultilingualCLIP, IFSafetyChecker, IFWatermarker"
        );
        let names: HashSet<&str> = CLASSES.iter().map(|c| c.name).collect();
        assert_eq!(names.len(), CLASSES.len());
        assert!(find("UNet2DConditionModel").is_some());
        assert!(find("ControlNetModel").is_some());
        assert!(find("T5EncoderModel").is_some());
        assert!(find("Kandinsky3UNet").is_none());
    }

    #[test]
    fn checks_and_messages_come_from_the_declaration() {
        let out = call("echo", &["x", "y"]).unwrap();
        assert_eq!(out[0].0, "x");
        let invalid = Code::InvalidArgument;
        assert_eq!(
            message(call("forward", &["x"]), invalid),
            "method: Echo has no method \"forward\" (methods: echo, undeclared, kernel)"
        );
        assert_eq!(
            message(call("echo", &["x", "z"]), invalid),
            "inputs.z: Echo.echo takes no input \"z\" (inputs: x, y)"
        );
        assert_eq!(
            message(call("echo", &["y"]), invalid),
            "inputs.x: Echo.echo requires it"
        );
        assert_eq!(
            message(call("echo", &["x", "x"]), invalid),
            "inputs.x: given more than once"
        );
        let wrong_rank = Echo.invoke(
            "echo",
            &vec![("x".to_string(), Tensor::zeros([2, 2], FLOAT))],
        );
        assert_eq!(
            message(wrong_rank, invalid),
            "inputs.x: Echo.echo needs 1 dimensions, got shape [2, 2]"
        );
        assert!(message(call("kernel", &["x"]), invalid)
            .starts_with("inputs: Echo.kernel rejected them: "));
        assert_eq!(
            message(call("undeclared", &[]), Code::Internal),
            "Echo.undeclared returned \"secret\", which it does not declare"
        );
    }
}
